// CoreDNS with only the plugins the local cluster's DNS needs (hack/coredns.sh writes its
// Corefile): the cluster.local zone and reverse lookups from the API server (kubernetes),
// everything else sent to the host's resolvers (forward), a cache, error and query logs, the
// listening address (bind), and liveness and readiness endpoints (health, ready).
//
// CoreDNS's own main imports core/plugin, which registers every plugin it ships (cloud DNS
// back-ends, etcd, ...). Importing a few plugin packages instead registers only those.
// dnsserver.Directives, the execution order, still names all of them; it need not be cut down:
// a server uses only the directives its Corefile names, and one that names an unregistered
// plugin fails at start-up ("no action found for directive").
package main

import (
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/bind"
	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/forward"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/ready"
)

func main() {
	coremain.Run()
}
