//! Backend selection: conntrack first (an established flow keeps its backend while that
//! backend lives; a reply finds its translation), then the frontend and Maglev for new flows.
use aya_ebpf::helpers::bpf_ktime_get_coarse_ns;
use lb_common::{
    AffinityEntry, AffinityKey, BACKEND_F_DRAINING, BACKEND_F_LOCAL, Backend,
    CONFIG_F_CONNTRACK_TOO, CT_FORWARD, CT_REVERSE, Config, CtEntry, Event, FLOW_F_HAIRPIN,
    FLOW_F_SNAT, FLOW_S_CLOSING, FLOW_S_FIN_BACKEND, FLOW_S_FIN_CLIENT, FLOW_S_REPLIED, FLOW_S_RST,
    FRONTEND_F_SNAT_REMOTE, FlowKey, FlowSlot, Frontend, FrontendKey, HAIRPIN_ADDR, IPPROTO_TCP,
    NAT_B_FIN, NAT_B_RST, NAT_F_HAIRPIN, NatEntry, RING_LANES, SNAT_CLOSING, Scope, Timeouts,
    Verdict, hash::flow_hash,
};

use crate::{
    conntrack,
    flows::{self, Probe},
    maps::{AFFINITY, BACKENDS, CONFIG, FRONTENDS, RINGS},
    parse::Flow,
    snat::{self, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    stats,
};

#[inline(always)]
pub fn frontend(f: &Flow, scope: u8) -> Option<Frontend> {
    frontend_at(f.dst_be, f.dport_be, f.proto, scope)
}

/// The frontend at (address, port, protocol) in `scope`.
#[inline(always)]
pub fn frontend_at(addr_be: u32, port_be: u16, proto: u8, scope: u8) -> Option<Frontend> {
    let k = FrontendKey {
        addr_be,
        port_be,
        proto,
        scope,
    };
    // SAFETY: the value is copied out at once.
    unsafe { FRONTENDS.get(k) }.copied()
}

/// The backend (id and entry) that hash `h` lands on in frontend `fe`'s Maglev ring.
#[inline(always)]
pub fn maglev_pick(fe: &Frontend, h: u32) -> Option<(u32, Backend)> {
    if fe.ring_size == 0 {
        return None;
    }
    let slot = fe
        .ring_offset
        .wrapping_add(h.checked_rem(fe.ring_size).unwrap_or(0));
    let id = ring_slot(slot);
    backend(id, None).map(|b| (id, b))
}

/// The node configuration (SNAT address and ranges, node addresses, timeouts).
#[inline(always)]
pub fn config() -> Option<&'static Config> {
    CONFIG.get(0)
}

/// Whether `addr_be` is one of the node's addresses (`Config::node_addrs_be`).
#[inline(always)]
pub fn is_node_addr(cfg: Option<&Config>, addr_be: u32) -> bool {
    let Some(c) = cfg else {
        return false;
    };
    let n = (c.node_addr_count as usize).min(c.node_addrs_be.len());
    c.node_addrs_be.iter().take(n).any(|a| *a == addr_be)
}

/// The configured timeouts (all defaults without a configuration).
#[inline(always)]
fn timeouts(cfg: Option<&Config>) -> Timeouts {
    cfg.map_or(Timeouts::default(), |c| c.timeouts)
}

/// What to do with a packet of a frontend's flow.
pub struct Forward {
    pub backend: Backend,
    pub backend_id: u32,
    pub service_id: u32,
    /// New source address for SNATed flows (0: not SNATed) and port. Plain fields rather than
    /// an `Option`: every path writes both, so the verifier never meets a port slot that one
    /// path left holding something else.
    pub snat_addr_be: u32,
    pub snat_port_be: u16,
    pub verdict: Verdict,
    /// The coarse second the packet was seen at (one clock read per packet).
    pub now_s: u32,
}

impl Forward {
    /// The new source of a SNATed flow.
    #[inline(always)]
    pub fn snat(&self) -> Option<(u32, u16)> {
        (self.snat_addr_be != 0).then_some((self.snat_addr_be, self.snat_port_be))
    }
}

/// A live backend by id: present, with an address, and (if `generation` is given) the same
/// incarnation a conntrack entry remembers.
#[inline(always)]
fn backend(id: u32, generation: Option<u32>) -> Option<Backend> {
    if id == 0 {
        return None;
    }
    let b = BACKENDS.get(id).copied()?;
    if b.addr_be == 0 || generation.is_some_and(|g| g != b.generation) {
        return None;
    }
    Some(b)
}

/// What conntrack knows about a packet's 5-tuple.
pub enum Tracked {
    /// An established flow whose backend still lives.
    Forward(Forward),
    /// A reply of a translated flow that was not SNATed.
    Reply(Reverse),
    /// No entry, or a forward entry whose backend is gone: the flow is balanced anew if it is
    /// addressed to a frontend.
    Untracked,
}

/// Looks the packet's 5-tuple up in conntrack: the flow table first (as a client's packet in
/// the bucket of its source, as a reply in the bucket of its destination), then the LRU
/// conntrack map if a bucket says flows of it went there. Done before the frontend lookup:
/// it serves established flows and replies, which are most packets; only a miss costs the
/// frontend lookup too. An established flow keeps its backend for as long as that backend
/// lives, even if its frontend was removed meanwhile (as kube-proxy's conntrack NAT does).
/// A draining backend keeps established TCP flows only: UDP flows move on, and so does a
/// TCP SYN (a new connection reusing an old 5-tuple must not reach a backend that left).
/// A client's SYN on a flow that is closing is a new connection on a reused port: it is
/// balanced anew (and a SNATed one gets a new SNAT port), as conntrack does for a SYN that
/// meets an entry in `TIME_WAIT`.
///
/// `replies`: whether the packet may be a reply of a flow that was not SNATed. The NIC hook
/// passes false for packets to the node's own addresses: such replies go to clients, which
/// are pods (a node's own processes are balanced at their sockets), and replies to the node
/// are SNATed flows', found in the SNAT table.
#[inline(always)]
pub fn tracked(key: &FlowKey, tcp_flags: u8, replies: bool, cfg: Option<&Config>) -> Tracked {
    let mut overflow = false;
    let syn = key.proto == IPPROTO_TCP && tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    if let Some(b) = flows::bucket(key.src_be, key.sport_be, key.proto) {
        match flows::forward(b, key) {
            Probe::Hit(p, s) => {
                let now = now_s();
                let snat = slot_snat(&s);
                // A SNATed flow's entry knows whether its connection was ever established
                // (see `consult`); other flows restart on a SYN once they close.
                if syn && snat.is_none() && s.state & FLOW_S_CLOSING != 0 {
                    stats::event(Event::FlowRestarted);
                    return Tracked::Untracked;
                }
                let Some(backend) = live(s.backend_id, s.backend_generation, key.proto, tcp_flags)
                else {
                    return Tracked::Untracked;
                };
                let mut mirrored = 0;
                let mut retried = false;
                if let Some(nat) = snat {
                    let flow = SnatFlow {
                        client: (s.client_addr_be, s.client_port_be),
                        frontend: (s.frontend_addr_be, s.frontend_port_be),
                        backend: (backend.addr_be, s.backend_port_be),
                        nat,
                        proto: key.proto,
                    };
                    let quiet = s.last_seen_s == now
                        && s.state & (FLOW_S_FIN_CLIENT | FLOW_S_FIN_BACKEND | FLOW_S_RST)
                            != FLOW_S_FIN_CLIENT;
                    match consult(&flow, tcp_flags, syn, quiet, now, cfg) {
                        Consult::Skip => {}
                        Consult::Mirror(bits) => mirrored = bits,
                        Consult::Retry => retried = true,
                        Consult::Gone => {
                            if syn {
                                stats::event(Event::FlowRestarted);
                            }
                            return Tracked::Untracked;
                        }
                    }
                }
                if retried {
                    restart_slot(p, &s, now);
                } else {
                    touch(p, &s, key.proto, tcp_flags, false, mirrored, now);
                }
                let (snat_addr_be, snat_port_be) = snat.unwrap_or((0, 0));
                return Tracked::Forward(Forward {
                    backend,
                    backend_id: s.backend_id,
                    service_id: s.service_id,
                    snat_addr_be,
                    snat_port_be,
                    verdict: Verdict::NatEstablished,
                    now_s: now,
                });
            }
            Probe::Miss { overflow: o } => overflow = o,
        }
    }
    if replies && let Some(b) = flows::bucket(key.dst_be, key.dport_be, key.proto) {
        match flows::reply(b, key) {
            Probe::Hit(p, s) => {
                touch(p, &s, key.proto, tcp_flags, true, 0, now_s());
                return Tracked::Reply(Reverse {
                    src: (s.frontend_addr_be, s.frontend_port_be),
                    dst: None,
                    service_id: s.service_id,
                });
            }
            Probe::Miss { overflow: o } => overflow |= o,
        }
    }
    if overflow {
        overflow_tracked(key, tcp_flags, syn, cfg)
    } else {
        Tracked::Untracked
    }
}

/// The backend of a tracked flow if the flow may still use it (see [`tracked`]).
#[inline(always)]
fn live(id: u32, generation: u32, proto: u8, tcp_flags: u8) -> Option<Backend> {
    let b = backend(id, Some(generation))?;
    (b.flags & BACKEND_F_DRAINING == 0
        || (proto == IPPROTO_TCP && tcp_flags & (TCP_SYN | TCP_ACK) != TCP_SYN))
        .then_some(b)
}

/// The new source of a flow-table flow that is SNATed (the address it was given then, even
/// if the node's SNAT address changed since: its SNAT entry is keyed by that one).
#[inline(always)]
fn slot_snat(s: &FlowSlot) -> Option<(u32, u16)> {
    (s.flags & (FLOW_F_SNAT | FLOW_F_HAIRPIN) != 0).then_some((s.peer_addr_be, s.nat_port_be))
}

/// Notes a packet of a flow-table flow (`reply`: one from its backend): refreshes its time
/// (at most one write a second), marks it answered at its first reply, and notes FINs (by
/// direction) and RSTs, with the closing mark an older datapath reads; `mirrored`: what a
/// SNATed flow's entry says of its backend (whose packets this slot does not see). Plain
/// stores of the two fields packets own (`last_seen_s`, `state`): a racing writer that
/// gives the slot to another flow meanwhile can at worst see a newer time or a wrong state,
/// which only changes when the slot may be reused.
#[inline(always)]
fn touch(
    p: *mut FlowSlot,
    s: &FlowSlot,
    proto: u8,
    tcp_flags: u8,
    reply: bool,
    mirrored: u8,
    now: u32,
) {
    let mut state = s.state | mirrored;
    if reply {
        state |= FLOW_S_REPLIED;
    }
    if proto == IPPROTO_TCP {
        if tcp_flags & TCP_RST != 0 {
            state |= FLOW_S_RST | FLOW_S_CLOSING;
        }
        if tcp_flags & TCP_FIN != 0 {
            state |= FLOW_S_CLOSING
                | if reply {
                    FLOW_S_FIN_BACKEND
                } else {
                    FLOW_S_FIN_CLIENT
                };
        }
    }
    // SAFETY: `p` points at a slot of the flow table (a map value).
    unsafe {
        if s.last_seen_s != now {
            (*p).last_seen_s = now;
        }
        if state != s.state {
            (*p).state = state;
        }
    }
}

/// A retried connect of a SNATed flow (see `snat::retry`): its slot starts over too.
#[inline(always)]
fn restart_slot(p: *mut FlowSlot, s: &FlowSlot, now: u32) {
    // SAFETY: `p` points at a slot of the flow table; the fields packets own.
    unsafe {
        (*p).last_seen_s = now;
        if s.state != FLOW_S_REPLIED {
            (*p).state = FLOW_S_REPLIED;
        }
    }
}

/// A SNATed (or hairpin) flow as its flow-table slot or conntrack entry knows it.
struct SnatFlow {
    client: (u32, u16),
    frontend: (u32, u16),
    backend: (u32, u16),
    nat: (u32, u16),
    proto: u8,
}

/// What a SNATed flow's entry says about a client's packet.
enum Consult {
    /// Not asked: nothing to note (refreshed this second already, no FIN, RST or SYN).
    Skip,
    /// The flow goes on; these state bits of its backend go into its slot.
    Mirror(u8),
    /// A retried connect: the flow starts over on its port (`snat::retry`).
    Retry,
    /// The entry is gone, over, or another flow's (its port was reused after its time): the
    /// packet starts a new flow.
    Gone,
}

/// Looks up (and notes the packet in) the SNAT entry of a client's packet of a SNATed flow,
/// unless `quiet` and the packet carries no FIN, RST or SYN. Forward packets refresh the
/// entry this way at most once a second, so a flow whose client keeps sending keeps its
/// port; a flow idle past its entry's timeout finds its port gone or given to another flow,
/// and starts a new one.
#[inline(always)]
fn consult(
    flow: &SnatFlow,
    tcp_flags: u8,
    syn: bool,
    quiet: bool,
    now: u32,
    cfg: Option<&Config>,
) -> Consult {
    if quiet && tcp_flags & (TCP_FIN | TCP_RST | TCP_SYN) == 0 {
        return Consult::Skip;
    }
    let k = snat::reply_key(flow.backend, flow.nat, flow.proto);
    if let Some((p, e)) = snat::find(&k) {
        let ours = e.client_addr_be == flow.client.0
            && e.client_port_be == flow.client.1
            && e.frontend_addr_be == flow.frontend.0
            && e.frontend_port_be == flow.frontend.1;
        if !ours || snat::expired(&e, now, &timeouts(cfg)) || (syn && snat::restarts(&e)) {
            return Consult::Gone;
        }
        if syn && snat::closing(&e) {
            snat::retry(p, now);
            return Consult::Retry;
        }
        snat::touch_forward(p, &e, tcp_flags, now);
        let mut bits = 0;
        if e.backend_state & NAT_B_FIN != 0 {
            bits |= FLOW_S_FIN_BACKEND | FLOW_S_CLOSING;
        }
        if e.backend_state & NAT_B_RST != 0 {
            bits |= FLOW_S_RST | FLOW_S_CLOSING;
        }
        return Consult::Mirror(bits);
    }
    if let Some(c) = cfg
        && let Some(e) = snat::legacy_find(&k, c)
    {
        // SAFETY: a legacy SNAT map value, copied out.
        let old = unsafe { *e };
        if old.client_addr_be != flow.client.0
            || old.client_port_be != flow.client.1
            || (syn && old.state == SNAT_CLOSING)
        {
            return Consult::Gone;
        }
        snat::legacy_touch(e, tcp_flags, false, now);
        return Consult::Mirror(0);
    }
    Consult::Gone
}

/// [`tracked`] for flows in the LRU conntrack map.
#[inline(always)]
fn overflow_tracked(key: &FlowKey, tcp_flags: u8, syn: bool, cfg: Option<&Config>) -> Tracked {
    let Some(ct) = conntrack::lookup(key) else {
        return Tracked::Untracked;
    };
    let now = now_s();
    if ct.kind == CT_REVERSE {
        return Tracked::Reply(Reverse {
            src: (ct.nat_addr_be, ct.nat_port_be),
            dst: None,
            service_id: ct.service_id,
        });
    }
    if ct.kind == CT_FORWARD
        && let Some(b) = live(ct.backend_id, ct.backend_generation, key.proto, tcp_flags)
    {
        let snat = (ct.nat_addr_be != 0).then_some((ct.nat_addr_be, ct.nat_port_be));
        if let Some(nat) = snat {
            let flow = SnatFlow {
                client: (key.src_be, key.sport_be),
                frontend: (key.dst_be, key.dport_be),
                backend: (b.addr_be, b.port_be),
                nat,
                proto: key.proto,
            };
            // Without a slot's time: looked up for FINs, RSTs and SYNs only.
            if let Consult::Gone = consult(&flow, tcp_flags, syn, true, now, cfg) {
                return Tracked::Untracked;
            }
        }
        return Tracked::Forward(Forward {
            backend: b,
            backend_id: ct.backend_id,
            service_id: ct.service_id,
            snat_addr_be: ct.nat_addr_be,
            snat_port_be: if ct.nat_addr_be == 0 {
                0
            } else {
                ct.nat_port_be
            },
            verdict: Verdict::NatEstablished,
            now_s: now,
        });
    }
    Tracked::Untracked
}

/// Which hook asks, which decides when a flow is SNATed.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    /// A node NIC: remote backends of frontends flagged for it get SNAT to the node.
    Nic,
    /// A pod interface: only a pod reaching itself (hairpin) gets SNAT, to `HAIRPIN_ADDR`.
    Pod,
}

/// Picks a backend for a new flow `f` (conntrack key `key`) to frontend `fe` by Maglev (or
/// the client's session affinity) and records it in conntrack.
#[inline(always)]
pub fn new_flow(
    f: &Flow,
    key: &FlowKey,
    fe: &Frontend,
    hook: Hook,
    cfg: Option<&Config>,
) -> Result<Forward, Verdict> {
    let h = flow_hash(f.src_be, f.dst_be, f.sport_be, f.dport_be, f.proto);
    let picked = if fe.affinity_timeout_s == 0 {
        maglev_pick(fe, h)
    } else {
        let scope = match hook {
            Hook::Nic => Scope::External,
            Hook::Pod => Scope::Internal,
        };
        affinity_pick(f.src_be, fe, h, scope as u8)
    };
    let (id, b) = picked.ok_or(Verdict::DropNoBackend)?;
    let now = now_s();
    let mut entry = NatEntry {
        backend_addr_be: b.addr_be,
        nat_addr_be: 0,
        client_addr_be: f.src_be,
        frontend_addr_be: f.dst_be,
        backend_port_be: b.port_be,
        nat_port_be: 0,
        client_port_be: f.sport_be,
        frontend_port_be: f.dport_be,
        service_id: fe.service_id,
        created_s: now,
        last_seen_s: now,
        proto: f.proto,
        client_state: 0,
        backend_state: 0,
        flags: 0,
    };
    let (nat_addr_be, nat_port_be) = match hook {
        Hook::Nic if b.flags & BACKEND_F_LOCAL == 0 && fe.flags & FRONTEND_F_SNAT_REMOTE != 0 => {
            reserve_snat(&mut entry, id, h, cfg)?
        }
        Hook::Pod if b.addr_be == f.src_be => reserve_hairpin(&mut entry, cfg)?,
        _ => (0, 0),
    };
    let snat = (nat_addr_be != 0).then_some((nat_addr_be, nat_port_be));
    let flags = match (hook, nat_addr_be != 0) {
        (_, false) => 0,
        (Hook::Nic, true) => FLOW_F_SNAT,
        (Hook::Pod, true) => FLOW_F_HAIRPIN,
    };
    let slot = FlowSlot {
        client_addr_be: f.src_be,
        frontend_addr_be: f.dst_be,
        peer_addr_be: if nat_addr_be == 0 {
            b.addr_be
        } else {
            nat_addr_be
        },
        client_port_be: f.sport_be,
        frontend_port_be: f.dport_be,
        backend_port_be: b.port_be,
        nat_port_be,
        backend_id: id,
        backend_generation: b.generation,
        service_id: fe.service_id,
        last_seen_s: now,
        proto: f.proto,
        flags,
        // SNATed flows' replies are not seen here (see FLOW_S_REPLIED).
        state: if nat_addr_be != 0 { FLOW_S_REPLIED } else { 0 },
        _pad: 0,
    };
    record(key, &slot, snat, b.addr_be, cfg)?;
    Ok(Forward {
        backend: b,
        backend_id: id,
        service_id: fe.service_id,
        snat_addr_be: nat_addr_be,
        snat_port_be: nat_port_be,
        verdict: Verdict::NatNew,
        now_s: now,
    })
}

/// Records a new flow: in its flow-table bucket (its own old slot, a free one or an expired
/// one), or, with every slot holding a live flow, in the LRU conntrack map, marking the
/// bucket so lookups look there too (and in both while `CONFIG_F_CONNTRACK_TOO` is set, for
/// the programs of an older datapath that may still run). The mark is set (and the bucket released) before the
/// LRU entries are written: nothing needs them before this packet has left, and no writer
/// holds a bucket across helper calls. (The agent clears a mark only when two sweeps a
/// minute apart found the bucket unchanged and without LRU entries.)
#[inline(always)]
fn record(
    key: &FlowKey,
    slot: &FlowSlot,
    snat: Option<(u32, u16)>,
    backend_addr_be: u32,
    cfg: Option<&Config>,
) -> Result<(), Verdict> {
    let b = flows::bucket(key.src_be, key.sport_be, key.proto).ok_or(Verdict::DropMapFull)?;
    let placed = {
        let mut bucket = flows::Locked::take(b).ok_or(Verdict::DropMapFull)?;
        let now = slot.last_seen_s;
        if let Some(i) = bucket.choose(key, |s| slot_expired(s, now, cfg)) {
            bucket.write(i, *slot);
            true
        } else {
            bucket.set_overflow();
            false
        }
    };
    if !placed {
        stats::event(Event::FlowOverflow);
    }
    if placed && cfg.is_none_or(|c| c.flags & CONFIG_F_CONNTRACK_TOO == 0) {
        return Ok(());
    }
    let (nat_addr_be, nat_port_be) = snat.unwrap_or((0, 0));
    let entry = CtEntry {
        backend_id: slot.backend_id,
        backend_generation: slot.backend_generation,
        nat_addr_be,
        service_id: slot.service_id,
        nat_port_be,
        kind: CT_FORWARD,
        _pad: 0,
    };
    conntrack::insert(key, &entry).map_err(|_| Verdict::DropMapFull)?;
    if snat.is_none() {
        // Replies come from the backend to the client; they must appear to come from the
        // frontend. (SNATed flows keep this in their SNAT entry.)
        let rev = conntrack::key(
            backend_addr_be,
            key.src_be,
            slot.backend_port_be,
            key.sport_be,
            key.proto,
        );
        let entry = CtEntry {
            backend_id: slot.backend_id,
            backend_generation: slot.backend_generation,
            nat_addr_be: key.dst_be,
            service_id: slot.service_id,
            nat_port_be: key.dport_be,
            kind: CT_REVERSE,
            _pad: 0,
        };
        conntrack::insert(&rev, &entry).map_err(|_| Verdict::DropMapFull)?;
    }
    Ok(())
}

/// Forgets the flow whose SNAT entry `prev` was (its port was given to another flow after
/// its time): its flow-table slot and conntrack entry, if they still name that port.
#[inline(always)]
fn forget(prev: &NatEntry) {
    let key = conntrack::key(
        prev.client_addr_be,
        prev.frontend_addr_be,
        prev.client_port_be,
        prev.frontend_port_be,
        prev.proto,
    );
    let uses_port = |addr: u32, port: u16| addr == prev.nat_addr_be && port == prev.nat_port_be;
    if let Some(b) = flows::bucket(key.src_be, key.sport_be, key.proto)
        && let Some(mut bucket) = flows::Locked::take(b)
    {
        bucket.remove(&key, |s| {
            s.flags & (FLOW_F_SNAT | FLOW_F_HAIRPIN) != 0
                && uses_port(s.peer_addr_be, s.nat_port_be)
        });
    }
    if conntrack::lookup(&key).is_some_and(|ct| uses_port(ct.nat_addr_be, ct.nat_port_be)) {
        conntrack::remove(&key);
    }
}

/// Whether a flow-table flow has been idle longer than its state allows, so its slot may be
/// given to a new flow.
#[inline(always)]
fn slot_expired(s: &FlowSlot, now: u32, cfg: Option<&Config>) -> bool {
    now.wrapping_sub(s.last_seen_s) > s.timeout(&timeouts(cfg))
}

/// `sessionAffinity: ClientIP`, as kube-proxy's `recent` match: a client that opened a
/// connection to this service port (in this scope) less than the timeout ago is placed in the
/// Maglev ring where its first connection was, so it reaches the same backend. Whatever that
/// slot holds is in this frontend's current ring: a backend that left (or any change of the
/// service) cannot be reached through a stale entry, and a client whose slot moved to another
/// backend (about 1/N of them when a backend is added) follows it. Every new connection
/// restarts the clock.
#[inline(always)]
pub fn affinity_pick(client_be: u32, fe: &Frontend, h: u32, scope: u8) -> Option<(u32, Backend)> {
    let key = AffinityKey {
        client_addr_be: client_be,
        service_id: fe.service_id,
        scope,
        _pad0: 0,
        _pad1: 0,
    };
    let now = now_s();
    if let Some(entry) = AFFINITY.get_ptr_mut(key) {
        // SAFETY: the map's value; a racing writer can at worst make this client's next
        // connection see a slightly different time or slot.
        let e = unsafe { *entry };
        if now.wrapping_sub(e.last_seen_s) < fe.affinity_timeout_s
            && let Some(picked) = maglev_pick(fe, e.hash)
        {
            // SAFETY: as above.
            unsafe { (*entry).last_seen_s = now };
            stats::event(Event::AffinityHit);
            return Some(picked);
        }
    }
    let picked = maglev_pick(fe, h)?;
    let entry = AffinityEntry {
        hash: h,
        last_seen_s: now,
    };
    // Best effort: without the entry the next connection is balanced anew.
    let _ = AFFINITY.insert(key, entry, 0);
    stats::event(Event::AffinityNew);
    Some(picked)
}

/// The backend id in ring slot `slot` (0 if out of range).
#[inline(always)]
fn ring_slot(slot: u32) -> u32 {
    RINGS
        .get(slot / RING_LANES)
        .and_then(|chunk| chunk.get((slot % RING_LANES) as usize))
        .copied()
        .unwrap_or(0)
}

/// Reserves a SNAT port of the node's SNAT address for new flow `entry` to backend `id`
/// (see `snat::reserve`); the flow whose expired entry it took over is forgotten.
#[inline(always)]
fn reserve_snat(
    entry: &mut NatEntry,
    id: u32,
    h: u32,
    cfg: Option<&Config>,
) -> Result<(u32, u16), Verdict> {
    let cfg = cfg.ok_or(Verdict::DropSnatExhausted)?;
    entry.nat_addr_be = cfg.snat_addr_be;
    let r = snat::reserve(entry, id, cfg, h).ok_or(Verdict::DropSnatExhausted)?;
    if let Some(prev) = r.previous {
        stats::event(Event::SnatPortReused);
        forget(&prev);
    }
    Ok((cfg.snat_addr_be, r.port_be))
}

/// Coarse seconds since boot.
#[inline(always)]
pub fn now_s() -> u32 {
    // SAFETY: plain helper call.
    (unsafe { bpf_ktime_get_coarse_ns() } / 1_000_000_000) as u32
}

/// A pod reaching itself: its packets come back from `HAIRPIN_ADDR` with its own source
/// port (unique among its own connections), so the reply tuple is free by construction.
#[inline(always)]
fn reserve_hairpin(entry: &mut NatEntry, cfg: Option<&Config>) -> Result<(u32, u16), Verdict> {
    let hairpin = u32::from_ne_bytes(HAIRPIN_ADDR);
    entry.nat_addr_be = hairpin;
    entry.nat_port_be = entry.client_port_be;
    entry.flags = NAT_F_HAIRPIN;
    if !snat::put_hairpin(entry, &timeouts(cfg)) {
        return Err(Verdict::DropMapFull);
    }
    Ok((hairpin, entry.client_port_be))
}

/// How a reply must be rewritten: new source, and for SNATed flows a new destination.
pub struct Reverse {
    pub src: (u32, u16),
    pub dst: Option<(u32, u16)>,
    pub service_id: u32,
}

/// Whether packet `f` may be the reply of a SNATed flow: to a node address (the SNAT
/// address, or one it had) on a port of the SNAT ranges, or to the hairpin address.
#[inline(always)]
pub fn may_be_snat_reply(f: &Flow, to_node: bool, cfg: Option<&Config>) -> bool {
    if f.dst_be == u32::from_ne_bytes(HAIRPIN_ADDR) {
        return true;
    }
    cfg.is_some_and(|c| {
        (to_node || f.dst_be == c.snat_addr_be) && c.is_snat_port(u16::from_be(f.dport_be))
    })
}

/// Looks up packet `f` (conntrack key `key`) as the reply of a SNATed flow (see
/// [`may_be_snat_reply`]) in the SNAT table, then in the legacy map, and notes it there.
#[inline(always)]
pub fn snat_reply(f: &Flow, key: &FlowKey, cfg: Option<&Config>) -> Option<Reverse> {
    let now = now_s();
    if let Some((p, e)) = snat::find(key) {
        snat::touch_reply(p, &e, f.tcp_flags, now);
        return Some(Reverse {
            src: (e.frontend_addr_be, e.frontend_port_be),
            dst: Some((e.client_addr_be, e.client_port_be)),
            service_id: e.service_id,
        });
    }
    let e = snat::legacy_find(key, cfg?)?;
    snat::legacy_touch(e, f.tcp_flags, true, now);
    // SAFETY: a legacy SNAT map value, copied out.
    let s = unsafe { *e };
    Some(Reverse {
        src: (s.frontend_addr_be, s.frontend_port_be),
        dst: Some((s.client_addr_be, s.client_port_be)),
        service_id: s.service_id,
    })
}
