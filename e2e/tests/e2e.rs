//! End-to-end tests: the real `stratus` binary, real etcd, real kubectl and client libraries.

mod e2e {
    mod attacks;
    mod auth_limits;
    mod bad_input;
    mod cli;
    mod clients;
    mod compute;
    mod dashboard;
    mod drivers;
    mod etcd;
    mod field_ownership;
    mod gc;
    mod guests_routers;
    mod guests_two_nodes;
    mod identity;
    mod images_swift;
    mod images_upload;
    mod images_url_store;
    mod ipam;
    mod kubectl;
    mod leader;
    mod metadata;
    mod namespace_lifecycle;
    mod network_agent;
    mod network_agent_ovs;
    mod object_agent;
    mod object_proxy;
    mod object_ring;
    mod port_hotplug;
    mod quota;
    mod replicas;
    mod routers;
    mod routers_api;
    mod runtime;
    mod scale;
    mod security_groups;
    mod server_ports;
    mod storage_agent;
    mod up;
    mod volume_attach;
    mod volume_attach_remote;
    mod volume_multi_attach;
    mod volumes_api;
    mod volumes_two_nodes;
    mod watch_feed;
}
