//! The packet path, one name in every layer (`probes::net` hooks the
//! kernel, `metrics::net` counts, `podscope trace net` prints): kube-proxy's
//! rules read into one Service map, whichever mode wrote them, and what the
//! probes saw attributed to pods, Services and endpoints.
//!
//! - [`iptables`]: kube-proxy's iptables mode, from `iptables-save`;
//! - [`nftables`]: kube-proxy's nftables mode, from `nft -j list table`;
//! - [`service_map`]: the Service map both readers fill, and the addresses
//!   where NodePorts answer;
//! - [`attribution`]: connections and drops named by pod, Service, endpoint;
//! - [`dying`]: connections DNATed to a pod that already got SIGTERM;
//! - [`conntrack`]: the older kernels' source of new connections
//!   (conntrack's netlink events), beside the netfilter program.
//!
//! The reads themselves run on the `kube_proxy_rules` dependency task
//! (`deps::rules`: deadline, kill and reap, output cap, back-off).

pub mod attribution;
pub mod conntrack;
pub mod dying;
pub mod iptables;
pub mod nftables;
pub mod service_map;

pub use attribution::{Connection, Outcome, PacketDrop, PodRef, Seen, connection, drop_events};
pub use dying::DyingEndpoints;
pub use service_map::{ServiceEntry, ServiceMap, ServiceRef, local_addrs};
