"""Every kind the operator reads or writes, written once: the children in apply order, and the rest.

The renderers produce one manifest per child role, the apply layer builds paths from the
plurals, the handlers watch each child kind, and the status cache forgets them all: each reads
this table, so a new child is added in one place.
"""

from __future__ import annotations

from dataclasses import dataclass

from forkless_operator.spec import API_VERSION, KIND, PLURAL


@dataclass(frozen=True)
class Kind:
    api_version: str
    kind: str
    plural: str

    @property
    def resource(self) -> tuple[str, str]:
        """(apiVersion, plural): how kopf's decorators name a resource."""
        return self.api_version, self.plural


@dataclass(frozen=True)
class Child:
    """One child object of an InferenceService: its role (the key renderers and the drift memory use),
    its kind, and its name, the InferenceService's name plus ``suffix``."""

    role: str
    kind: Kind
    suffix: str = ""

    def name(self, owner: str) -> str:
        return owner + self.suffix


DEPLOYMENT = Kind("apps/v1", "Deployment", "deployments")
SERVICE = Kind("v1", "Service", "services")
HPA = Kind("autoscaling/v2", "HorizontalPodAutoscaler", "horizontalpodautoscalers")
PDB = Kind("policy/v1", "PodDisruptionBudget", "poddisruptionbudgets")
# KEDA's; rendered for autoscaling.class keda only, where KEDA is installed.
SCALED_OBJECT = Kind("keda.sh/v1alpha1", "ScaledObject", "scaledobjects")
# KubeRay's; the one child of an engine ray InferenceService (KubeRay makes the cluster and Services).
RAY_SERVICE = Kind("ray.io/v1", "RayService", "rayservices")
# The children, in apply order; optional ones (HPA, PDB) are deleted when no longer rendered. The
# `-predictor` Service is KServe's name for the same pods: KServe clients keep their URL.
CHILDREN = (
    Child("Deployment", DEPLOYMENT),
    Child("Service", SERVICE),
    Child("PredictorService", SERVICE, "-predictor"),
    Child("HorizontalPodAutoscaler", HPA),
    Child("ScaledObject", SCALED_OBJECT),
    Child("PodDisruptionBudget", PDB),
    Child("RayService", RAY_SERVICE),
)
CHILD_KINDS = (DEPLOYMENT, SERVICE, HPA, SCALED_OBJECT, PDB, RAY_SERVICE)  # each watched once


def child_of(kind: str, name: str, owner: str) -> Child | None:
    """Which child of ``owner`` an object of ``kind`` named ``name`` is."""
    return next((c for c in CHILDREN if c.kind.kind == kind and c.name(owner) == name), None)

PODS = Kind("v1", "Pod", "pods")
PVC = Kind("v1", "PersistentVolumeClaim", "persistentvolumeclaims")
# Read for download credentials (forkless_operator.credentials), never written.
SERVICE_ACCOUNT = Kind("v1", "ServiceAccount", "serviceaccounts")
SECRET = Kind("v1", "Secret", "secrets")
INFERENCE_SERVICE = Kind(API_VERSION, KIND, PLURAL)

ALL = (*CHILD_KINDS, PODS, PVC, SERVICE_ACCOUNT, SECRET, INFERENCE_SERVICE)
