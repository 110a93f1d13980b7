//! For the proxy's unit tests: routing tables as the elector would publish them, built by hand,
//! and settings.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use super::ProxySettings;
use crate::topology::{BackendId, BackendState, BackendView, Probe, Reason, Role, RoutingTable};

/// A table over backends at `addresses` naming `leader` (an index) in `epoch`; the others are
/// replicas.
pub(crate) fn table(addresses: &[SocketAddr], leader: Option<u32>, epoch: u64) -> Arc<RoutingTable> {
    let backends = (0u32..)
        .zip(addresses)
        .map(|(i, &address)| {
            let primary = leader == Some(i);
            let probe =
                Probe { address, in_recovery: !primary, timeline: primary.then_some(1), system_id: Some(7), wal: None };
            BackendView {
                id: BackendId(i),
                name: format!("b{i}"),
                address: address.to_string(),
                state: BackendState { last_probe: Some(probe), ..BackendState::default() },
                role: if primary { Role::Primary } else { Role::Replica },
                routable: primary,
                cut: None,
                member: format!("b{i}"),
                member_problem: None,
                lease_until: None,
                lag: None,
                readable: false,
                read_block: None,
                read_cut: None,
                out_of_bounds_streak: 0,
                counted_check: 0,
            }
        })
        .collect();
    Arc::new(RoutingTable {
        leader: leader.map(BackendId),
        reason: if leader.is_some() { Reason::SolePrimary } else { Reason::NoPrimary },
        epoch,
        backends,
        max_timelines: Default::default(),
        history: Vec::new(),
        fence: None,
        read: None,
        lag: Default::default(),
    })
}

/// Settings with short timeouts and no spares.
pub(crate) fn settings() -> ProxySettings {
    ProxySettings {
        leader_wait_timeout: Duration::from_secs(10),
        connect_timeout: Duration::from_secs(2),
        client_hello_timeout: Duration::from_secs(5),
        allow: Vec::new(),
        access_log: false,
        max_connections: 10,
        spare_connections: 0,
        spare_max_age: Duration::from_secs(20),
    }
}
