-- Argo CD health check for serving.forkless.dev/InferenceService.
--
-- It reads one condition, Ready, and its observedGeneration: the operator keeps
-- that contract stable, so this check does not break when conditions are added
-- (unlike checks that count condition types). Install: docs/gitops/argocd-cm.yaml.
--
--   Healthy      Ready=True for the current generation (metadata.generation)
--   Degraded     Ready=False for the current generation, for a reason that
--                needs a person: the spec, the image, the cluster's capacity
--   Progressing  anything else: no status yet, a generation the operator has
--                not observed yet, or Ready=False while a rollout proceeds

local DEGRADED_REASONS = {
  -- the spec cannot be served as written
  InvalidSpec = true,
  RuntimeImageNotConfigured = true,
  ApplyFailed = true,
  ModelClaimNotFound = true,
  -- no node can take the pods (e.g. more GPUs than any node has)
  Unschedulable = true,
  -- the runtime container cannot start
  ErrImagePull = true,
  ImagePullBackOff = true,
  InvalidImageName = true,
  CreateContainerConfigError = true,
  CreateContainerError = true,
  CrashLoopBackOff = true,
  -- the Deployment gave up on its rollout
  ProgressDeadlineExceeded = true,
  -- engine ray: Serve could not deploy the model, KubeRay gave up on the cluster, or is not installed
  ServeDeployFailed = true,
  RayInitializingTimeout = true,
  KubeRayNotInstalled = true,
}

local health = {status = "Progressing", message = "Waiting for the operator to report the Ready condition"}

if obj.status == nil or obj.status.conditions == nil then
  return health
end

local ready = nil
for _, condition in ipairs(obj.status.conditions) do
  if condition.type == "Ready" then
    ready = condition
  end
end
if ready == nil then
  return health
end

local generation = obj.metadata.generation
local observed = ready.observedGeneration
if observed == nil then
  observed = obj.status.observedGeneration
end
if generation ~= nil and (observed == nil or observed < generation) then
  health.message = "Waiting for the operator to observe generation " .. tostring(generation)
  return health
end

local message = ready.message or ""
if ready.reason ~= nil and ready.reason ~= "" then
  message = ready.reason .. ": " .. message
end

if ready.status == "True" then
  health.status = "Healthy"
elseif ready.status == "False" and DEGRADED_REASONS[ready.reason] then
  health.status = "Degraded"
end
health.message = message
return health
