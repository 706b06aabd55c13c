//go:build tools

// Package tools names the commands hack/tools.sh builds (the control plane, and the
// kubelet and kube-proxy of the real node) from this module, so
// that `go mod tidy` keeps every dependency (and go.sum entry) they need.
package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-proxy"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubectl"
	_ "k8s.io/kubernetes/cmd/kubelet"
)
