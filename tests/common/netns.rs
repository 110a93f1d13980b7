//! The runbook's three nodes as Linux network namespaces on this machine (issue 12): one
//! namespace per node, joined by a bridge with no uplink, and the faults the partition suite
//! injects between them.
//!
//! Rules this module keeps (and that the suite depends on):
//! - Addresses come only from the documentation range 198.51.100.0/24 (RFC 5737); no namespace
//!   has a default route and the bridge has no address and no uplink, so a packet can only go to
//!   another of this run's namespaces. Nothing here sends traffic anywhere else.
//! - Every name carries the owning process id: namespaces `pgl-<node>-<pid>`, host-side veths
//!   `pl<o|e|m><pid>`, the bridge `plbr<pid>` (interface names fit in 15 characters). A run only
//!   ever touches its own names, and removes the leftovers of runs whose process is gone.
//! - `Drop` kills every process still inside the namespaces (they are ours by construction),
//!   then deletes the namespaces, the veths and the bridge, also when a test panics.
//! - Without root or without `ip netns` the suite fails with a message that says so; it never
//!   skips.
//!
//! Faults. This machine's kernel has no `sch_netem` (`CONFIG_NET_SCH_NETEM` is not set) and no tc
//! drop or police action, so only the link cut is done with `ip`; loss in one direction is an
//! `iptables` DROP rule in the node's namespace, and added latency is an `iptables` NFQUEUE rule
//! whose packets a [`Delayer`] thread (inside the namespace) releases after a fixed delay.
//!
//! Code that must open sockets inside a namespace (the writers, the harness's own SQL and HTTP)
//! runs on that namespace's [`NsRuntime`]: a thread that `setns()`ed into it and drives a
//! current-thread tokio runtime. Programs (etcd, Patroni, HAProxy, pgleader) run under
//! `nsenter --net=...`, which execs them: the child's PID is the program's.

#![allow(dead_code)] // each test binary uses a different part of the harness

use std::fs::File;
use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio_util::sync::CancellationToken;

/// The three nodes of the runbook and their addresses in 198.51.100.0/24.
pub const NODES: [(&str, Ipv4Addr); 3] = [
    ("optiplex", Ipv4Addr::new(198, 51, 100, 1)),
    ("epyc", Ipv4Addr::new(198, 51, 100, 2)),
    ("mac", Ipv4Addr::new(198, 51, 100, 3)),
];

/// The interface inside every namespace.
pub const IFACE: &str = "eth0";

/// Fails (panics) with what to do unless this process can make network namespaces.
pub fn require_netns() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the partition suite needs root: it creates network namespaces, a bridge and veths with \
         `ip netns` / `ip link` (run it as root, as scripts/test and CI do)"
    );
    for (tool, args, pkg) in [
        ("ip", &["netns", "list"][..], "iproute2"),
        ("iptables", &["-V"][..], "iptables"),
        ("nsenter", &["-V"][..], "util-linux"),
    ] {
        let ok = Command::new(tool).args(args).output().is_ok_and(|o| o.status.success());
        assert!(ok, "the partition suite needs `{tool} {}`: apt-get install -y {pkg}", args.join(" "));
    }
}

/// Runs a command that must succeed; the panic names it and its stderr.
pub fn sh(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().unwrap_or_else(|e| panic!("spawn {program}: {e}"));
    assert!(
        out.status.success(),
        "`{program} {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Like [`sh`] but for teardown: failures are ignored.
fn sh_quiet(program: &str, args: &[&str]) {
    let _ = Command::new(program).args(args).output();
}

fn pid_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// One node's namespace.
pub struct Netns {
    /// The runbook's node name (`optiplex`, `epyc`, `mac`).
    pub node: String,
    /// The namespace's name under /run/netns.
    pub name: String,
    pub addr: Ipv4Addr,
    /// The veth end on the bridge (in the root namespace): down is "cut off".
    host_if: String,
    /// Drives async code inside the namespace; stopped on drop.
    pub rt: NsRuntime,
}

impl Netns {
    /// `/run/netns/<name>`, for `nsenter --net=`.
    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// A command that runs `program` inside this namespace (as `uid:gid` when given).
    pub fn command(&self, program: &std::path::Path, as_user: Option<(u32, u32)>) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.path()));
        if let Some((uid, gid)) = as_user {
            cmd.arg("-S").arg(uid.to_string()).arg("-G").arg(gid.to_string());
        }
        cmd.arg("--").arg(program);
        cmd
    }

    /// Runs `program args` inside the namespace; must succeed.
    pub fn exec(&self, program: &str, args: &[&str]) -> String {
        let mut all = vec!["netns", "exec", &self.name, program];
        all.extend_from_slice(args);
        sh("ip", &all)
    }

    /// PIDs of the processes inside the namespace.
    pub fn pids(&self) -> Vec<i32> {
        let out = Command::new("ip").args(["netns", "pids", &self.name]).output();
        out.map(|o| String::from_utf8_lossy(&o.stdout).split_whitespace().filter_map(|p| p.parse().ok()).collect())
            .unwrap_or_default()
    }
}

/// The namespaces, the bridge and the veths of one run.
pub struct Net {
    pub nodes: Vec<Netns>,
    bridge: String,
    /// Live delayers (latency faults), stopped before the namespaces go.
    delayers: Vec<Delayer>,
}

impl Net {
    /// Removes leftovers of dead runs, then lays out the three namespaces on a fresh bridge.
    pub fn create() -> Net {
        require_netns();
        remove_orphans();
        let pid = std::process::id();
        let bridge = format!("plbr{pid}");
        sh("ip", &["link", "add", &bridge, "type", "bridge"]);
        // Guard first: from here on a panic removes whatever exists.
        let mut net = Net { nodes: Vec::new(), bridge: bridge.clone(), delayers: Vec::new() };
        sh("ip", &["link", "set", &bridge, "up"]);
        for (node, addr) in NODES {
            let name = format!("pgl-{node}-{pid}");
            let host_if = format!("pl{}{pid}", &node[..1]);
            sh("ip", &["netns", "add", &name]);
            let rt = NsRuntime::start(&format!("/run/netns/{name}"), node);
            net.nodes.push(Netns { node: node.to_owned(), name: name.clone(), addr, host_if: host_if.clone(), rt });
            sh("ip", &["link", "add", &host_if, "type", "veth", "peer", "name", IFACE, "netns", &name]);
            sh("ip", &["link", "set", &host_if, "master", &bridge, "up"]);
            let ns = &net.nodes[net.nodes.len() - 1];
            ns.exec("ip", &["link", "set", "lo", "up"]);
            ns.exec("ip", &["addr", "add", &format!("{addr}/24"), "dev", IFACE]);
            ns.exec("ip", &["link", "set", IFACE, "up"]);
        }
        for ns in &net.nodes {
            let routes = ns.exec("ip", &["route", "show", "default"]);
            assert!(routes.trim().is_empty(), "{}: a default route exists: {routes}", ns.name);
        }
        net
    }

    /// The namespace of `node`.
    pub fn node(&self, node: &str) -> &Netns {
        self.nodes.iter().find(|n| n.node == node).unwrap_or_else(|| panic!("no node {node}"))
    }

    /// Cut `node` off: its link to the bridge goes down (both directions, all peers).
    pub fn cut(&self, node: &str) {
        sh("ip", &["link", "set", &self.node(node).host_if, "down"]);
    }

    /// Undo [`Net::cut`].
    pub fn reconnect(&self, node: &str) {
        sh("ip", &["link", "set", &self.node(node).host_if, "up"]);
    }

    /// Drop every packet that arrives at `node` from the other nodes; what it sends still goes out.
    pub fn drop_incoming(&self, node: &str) {
        self.node(node).exec("iptables", &["-w", "-I", "INPUT", "-i", IFACE, "-j", "DROP"]);
    }

    /// Undo [`Net::drop_incoming`].
    pub fn accept_incoming(&self, node: &str) {
        self.node(node).exec("iptables", &["-w", "-D", "INPUT", "-i", IFACE, "-j", "DROP"]);
    }

    /// Delay every packet each node sends to the others by `one_way` (so a round trip between two
    /// nodes gains `2 * one_way`), until [`Net::undelay`].
    pub fn delay(&mut self, one_way: Duration) {
        for ns in &self.nodes {
            ns.exec(
                "iptables",
                &["-w", "-I", "OUTPUT", "-o", IFACE, "-j", "NFQUEUE", "--queue-num", "1", "--queue-bypass"],
            );
            self.delayers.push(Delayer::start(&ns.path(), 1, one_way));
        }
    }

    /// Undo [`Net::delay`]: rules first, then the delayers release what they hold.
    pub fn undelay(&mut self) {
        for ns in &self.nodes {
            ns.exec(
                "iptables",
                &["-w", "-D", "OUTPUT", "-o", IFACE, "-j", "NFQUEUE", "--queue-num", "1", "--queue-bypass"],
            );
        }
        for d in self.delayers.drain(..) {
            d.stop();
        }
    }

    /// Kills (SIGCONT, SIGKILL) every process inside the namespaces until none is left (bounded).
    pub fn kill_everything_inside(&self) {
        kill_pids_until_empty(|| self.nodes.iter().flat_map(Netns::pids).collect());
    }
}

fn kill_pids_until_empty(pids: impl Fn() -> Vec<i32>) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let left = pids();
        if left.is_empty() || std::time::Instant::now() > deadline {
            return;
        }
        for pid in left {
            let _ = kill(Pid::from_raw(pid), Signal::SIGCONT);
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for d in self.delayers.drain(..) {
            d.stop();
        }
        self.kill_everything_inside();
        for ns in &mut self.nodes {
            ns.rt.stop();
            sh_quiet("ip", &["link", "del", &ns.host_if]);
            sh_quiet("ip", &["netns", "del", &ns.name]);
        }
        sh_quiet("ip", &["link", "del", &self.bridge]);
    }
}

/// The owning PID in one of our names: `pgl-<node>-<pid>` or `pl<x><pid>` / `plbr<pid>`.
fn owner_of(name: &str) -> Option<u32> {
    if let Some(rest) = name.strip_prefix("pgl-") {
        let (node, pid) = rest.rsplit_once('-')?;
        return NODES.iter().any(|(n, _)| *n == node).then(|| pid.parse().ok()).flatten();
    }
    let rest = name.strip_prefix("plbr").or_else(|| {
        let r = name.strip_prefix("pl")?;
        r.strip_prefix(['o', 'e', 'm'])
    })?;
    (!rest.is_empty() && rest.bytes().all(|b| b.is_ascii_digit())).then(|| rest.parse().ok()).flatten()
}

/// Removes namespaces (with the processes inside) and links left by runs whose process is gone.
pub fn remove_orphans() {
    let me = std::process::id();
    let list = sh("ip", &["netns", "list"]);
    for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
        let Some(owner) = owner_of(name) else { continue };
        if owner == me || pid_alive(owner) {
            continue;
        }
        eprintln!("partition harness: removing namespace {name} left by dead process {owner}");
        let pids = || {
            let o = Command::new("ip").args(["netns", "pids", name]).output();
            o.map(|o| String::from_utf8_lossy(&o.stdout).split_whitespace().filter_map(|p| p.parse().ok()).collect())
                .unwrap_or_default()
        };
        kill_pids_until_empty(pids);
        sh_quiet("ip", &["netns", "del", name]);
    }
    let links = sh("ip", &["-o", "link", "show"]);
    for line in links.lines() {
        // "7: plo1234@if2: <...>" or "9: plbr1234: <...>"
        let Some(name) = line.split(": ").nth(1).map(|n| n.split('@').next().unwrap_or(n)) else { continue };
        let Some(owner) = owner_of(name) else { continue };
        if owner != me && !pid_alive(owner) {
            eprintln!("partition harness: removing link {name} left by dead process {owner}");
            sh_quiet("ip", &["link", "del", name]);
        }
    }
}

/// A thread inside a network namespace that drives a current-thread tokio runtime: futures
/// given to [`NsRuntime::run`] or [`NsRuntime::spawn`] open their sockets in that namespace.
pub struct NsRuntime {
    handle: tokio::runtime::Handle,
    /// Cancelled by [`NsRuntime::stop`]; the thread's `block_on` returns and the runtime drops.
    stop: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl NsRuntime {
    fn start(ns_path: &str, node: &str) -> NsRuntime {
        let (tx, rx) = std::sync::mpsc::channel();
        let stop = CancellationToken::new();
        let stop2 = stop.clone();
        let path = ns_path.to_owned();
        let thread = std::thread::Builder::new()
            .name(format!("netns-{node}"))
            .spawn(move || {
                let entered = File::open(&path).map_err(|e| e.to_string()).and_then(|f| {
                    nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| e.to_string())
                });
                let rt = entered.and_then(|()| {
                    tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())
                });
                match rt {
                    Ok(rt) => {
                        let _ = tx.send(Ok(rt.handle().clone()));
                        rt.block_on(stop2.cancelled());
                    }
                    Err(e) => {
                        let _ = tx.send(Err(format!("enter {path}: {e}")));
                    }
                }
            })
            .expect("spawn a namespace thread");
        let handle = rx.recv().expect("namespace thread answers").unwrap_or_else(|e| panic!("{e}"));
        NsRuntime { handle, stop, thread: Some(thread) }
    }

    /// Runs `fut` inside the namespace and returns its output.
    pub async fn run<T: Send + 'static>(&self, fut: impl std::future::Future<Output = T> + Send + 'static) -> T {
        self.handle.spawn(fut).await.expect("a task inside the namespace panicked")
    }

    /// Spawns `fut` inside the namespace.
    pub fn spawn<T: Send + 'static>(
        &self,
        fut: impl std::future::Future<Output = T> + Send + 'static,
    ) -> tokio::task::JoinHandle<T> {
        self.handle.spawn(fut)
    }

    fn stop(&mut self) {
        self.stop.cancel();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for NsRuntime {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Holds every packet of one NFQUEUE queue for a fixed delay, then accepts it: netem's `delay`
/// done in user space (see the module doc). A thread inside the namespace owns a netlink socket
/// bound to the queue; packets keep their order (verdicts are issued in arrival order).
/// Only packet metadata is copied to user space, never a payload.
pub struct Delayer {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Result<u64, String>>>,
}

impl Delayer {
    fn start(ns_path: &str, queue: u16, delay: Duration) -> Delayer {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let stop2 = stop.clone();
        let path = ns_path.to_owned();
        let thread = std::thread::spawn(move || {
            let setup = File::open(&path)
                .map_err(|e| e.to_string())
                .and_then(|f| nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| e.to_string()))
                .and_then(|()| nfqueue::bind(queue));
            match setup {
                Ok(sock) => {
                    let _ = ready_tx.send(Ok(()));
                    nfqueue::delay_loop(sock, queue, delay, &stop2)
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e.clone()));
                    Err(e)
                }
            }
        });
        ready_rx
            .recv()
            .expect("delayer thread answers")
            .unwrap_or_else(|e| panic!("NFQUEUE delayer in {ns_path}: {e}"));
        Delayer { stop, thread: Some(thread) }
    }

    /// Stops the thread after it released every packet it holds; prints how many it delayed.
    fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            match t.join() {
                Ok(Ok(n)) => eprintln!("delayer: {n} packets delayed"),
                Ok(Err(e)) => eprintln!("delayer failed: {e}"),
                Err(_) => eprintln!("delayer thread panicked"),
            }
        }
    }
}

impl Drop for Delayer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The few NFQUEUE netlink messages the delayer needs (linux/netfilter/nfnetlink_queue.h),
/// over a plain `socket2` netlink socket: bind a queue in metadata-copy mode, read packet ids,
/// send batch verdicts (a batch verdict accepts every queued packet up to an id).
mod nfqueue {
    use std::collections::VecDeque;
    use std::io::{Read, Write};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::{Duration, Instant};

    use socket2::{Domain, Protocol, Socket, Type};

    const AF_NETLINK: i32 = 16;
    const NETLINK_NETFILTER: i32 = 12;
    const NFNL_SUBSYS_QUEUE: u16 = 3;
    const NFQNL_MSG_PACKET: u16 = 0;
    const NFQNL_MSG_CONFIG: u16 = 2;
    const NFQNL_MSG_VERDICT_BATCH: u16 = 3;
    const NFQA_PACKET_HDR: u16 = 1;
    const NFQA_VERDICT_HDR: u16 = 2;
    const NFQA_CFG_CMD: u16 = 1;
    const NFQA_CFG_PARAMS: u16 = 2;
    const NFQA_CFG_QUEUE_MAXLEN: u16 = 3;
    const NFQNL_CFG_CMD_BIND: u8 = 1;
    const NFQNL_COPY_META: u8 = 1;
    const NF_ACCEPT: u32 = 1;
    const NLM_F_REQUEST: u16 = 1;
    const NLM_F_ACK: u16 = 4;
    const NLMSG_ERROR: u16 = 2;
    const ENOBUFS: i32 = 105;

    fn attr(buf: &mut Vec<u8>, kind: u16, payload: &[u8]) {
        buf.extend_from_slice(&((4 + payload.len()) as u16).to_ne_bytes());
        buf.extend_from_slice(&kind.to_ne_bytes());
        buf.extend_from_slice(payload);
        while !buf.len().is_multiple_of(4) {
            buf.push(0);
        }
    }

    /// nlmsghdr + nfgenmsg (AF_UNSPEC, version 0, queue number big-endian) + attributes.
    fn message(msg: u16, flags: u16, queue: u16, attrs: &[u8]) -> Vec<u8> {
        let mut m = Vec::with_capacity(20 + attrs.len());
        m.extend_from_slice(&((20 + attrs.len()) as u32).to_ne_bytes());
        m.extend_from_slice(&((NFNL_SUBSYS_QUEUE << 8) | msg).to_ne_bytes());
        m.extend_from_slice(&(NLM_F_REQUEST | flags).to_ne_bytes());
        m.extend_from_slice(&[0; 8]); // seq, port id (the kernel's is 0)
        m.extend_from_slice(&[0, 0]);
        m.extend_from_slice(&queue.to_be_bytes());
        m.extend_from_slice(attrs);
        m
    }

    fn u16_at(b: &[u8], at: usize) -> Option<u16> {
        Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
    }

    fn u32_at(b: &[u8], at: usize) -> Option<u32> {
        Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
    }

    /// Splits a datagram into (type, payload after nlmsghdr) pairs.
    fn messages(buf: &[u8]) -> Vec<(u16, &[u8])> {
        let mut out = Vec::new();
        let mut at = 0;
        while let (Some(len), Some(kind)) = (u32_at(buf, at), u16_at(buf, at + 4)) {
            let len = len as usize;
            if len < 16 || at + len > buf.len() {
                break;
            }
            out.push((kind, &buf[at + 16..at + len]));
            at += (len + 3) & !3;
        }
        out
    }

    /// The packet id of an NFQNL_MSG_PACKET payload (nfgenmsg, then attributes).
    fn packet_id(payload: &[u8]) -> Option<u32> {
        let mut at = 4;
        while let (Some(len), Some(kind)) = (u16_at(payload, at), u16_at(payload, at + 2)) {
            let len = len as usize;
            if len < 4 {
                return None;
            }
            if kind & 0x3fff == NFQA_PACKET_HDR {
                return Some(u32::from_be_bytes(payload.get(at + 4..at + 8)?.try_into().ok()?));
            }
            at += (len + 3) & !3;
        }
        None
    }

    pub fn bind(queue: u16) -> Result<Socket, String> {
        let mut sock = Socket::new(Domain::from(AF_NETLINK), Type::RAW, Some(Protocol::from(NETLINK_NETFILTER)))
            .map_err(|e| format!("netlink socket: {e}"))?;
        let _ = sock.set_recv_buffer_size(8 << 20);
        let mut attrs = Vec::new();
        attr(&mut attrs, NFQA_CFG_CMD, &[NFQNL_CFG_CMD_BIND, 0, 0, 0]); // command, pad, pf (unused since 3.8)
        let mut params = 0u32.to_be_bytes().to_vec(); // copy_range: no payload
        params.push(NFQNL_COPY_META);
        attr(&mut attrs, NFQA_CFG_PARAMS, &params);
        attr(&mut attrs, NFQA_CFG_QUEUE_MAXLEN, &65_536u32.to_be_bytes());
        sock.write_all(&message(NFQNL_MSG_CONFIG, NLM_F_ACK, queue, &attrs)).map_err(|e| format!("bind queue: {e}"))?;
        let mut buf = vec![0u8; 4096];
        sock.set_read_timeout(Some(Duration::from_secs(2))).map_err(|e| e.to_string())?;
        let n = sock.read(&mut buf).map_err(|e| format!("bind queue {queue}: no answer: {e}"))?;
        for (kind, payload) in messages(&buf[..n]) {
            if kind == NLMSG_ERROR {
                let errno = u32_at(payload, 0).map_or(0, |e| e as i32);
                if errno != 0 {
                    return Err(format!("bind queue {queue}: kernel error {}", -errno));
                }
            }
        }
        Ok(sock)
    }

    fn accept_up_to(sock: &mut Socket, queue: u16, id: u32) -> Result<(), String> {
        let mut attrs = Vec::new();
        let mut hdr = NF_ACCEPT.to_be_bytes().to_vec();
        hdr.extend_from_slice(&id.to_be_bytes());
        attr(&mut attrs, NFQA_VERDICT_HDR, &hdr);
        sock.write_all(&message(NFQNL_MSG_VERDICT_BATCH, 0, queue, &attrs)).map_err(|e| format!("verdict: {e}"))
    }

    /// Holds each packet `delay` after it arrived, then accepts it; returns the count on stop.
    pub fn delay_loop(mut sock: Socket, queue: u16, delay: Duration, stop: &AtomicBool) -> Result<u64, String> {
        let mut held: VecDeque<(Instant, u32)> = VecDeque::new();
        let mut buf = vec![0u8; 65_536];
        let mut count = 0u64;
        loop {
            let now = Instant::now();
            let mut last_due = None;
            while held.front().is_some_and(|(due, _)| *due <= now) {
                last_due = held.pop_front().map(|(_, id)| id);
            }
            if let Some(id) = last_due {
                accept_up_to(&mut sock, queue, id)?;
            }
            if stop.load(Ordering::Relaxed) {
                if let Some((_, id)) = held.back() {
                    accept_up_to(&mut sock, queue, *id)?;
                }
                return Ok(count);
            }
            let wait = held.front().map_or(Duration::from_millis(20), |(due, _)| due.saturating_duration_since(now));
            sock.set_read_timeout(Some(wait.clamp(Duration::from_millis(1), Duration::from_millis(20))))
                .map_err(|e| e.to_string())?;
            match sock.read(&mut buf) {
                Ok(n) => {
                    let arrived = Instant::now();
                    for (kind, payload) in messages(&buf[..n]) {
                        if kind == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET {
                            if let Some(id) = packet_id(payload) {
                                held.push_back((arrived + delay, id));
                                count += 1;
                            }
                        }
                    }
                }
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                // Our receive buffer overflowed: some packets' metadata were lost; the next batch
                // verdict (ids are increasing) still releases them.
                Err(e) if e.raw_os_error() == Some(ENOBUFS) => {}
                Err(e) => return Err(format!("read queue {queue}: {e}")),
            }
        }
    }
}
