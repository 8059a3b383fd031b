//! Backend selection: conntrack first (an established flow keeps its backend while that
//! backend lives; a reply finds its translation), then the frontend and Maglev for new flows.
use aya_ebpf::helpers::bpf_ktime_get_coarse_ns;
use lb_common::{
    AffinityEntry, AffinityKey, BACKEND_F_DRAINING, BACKEND_F_LOCAL, Backend,
    CONFIG_F_CONNTRACK_TOO, CT_FORWARD, CT_REVERSE, Config, CtEntry, Event, FLOW_F_HAIRPIN,
    FLOW_F_SNAT, FLOW_S_CLOSING, FLOW_S_REPLIED, FRONTEND_F_SNAT_REMOTE, FlowKey, FlowSlot,
    Frontend, FrontendKey, HAIRPIN_ADDR, IPPROTO_TCP, RING_LANES, SNAT_CLOSING, SNAT_ESTABLISHED,
    SNAT_NEW, Scope, SnatEntry, Verdict, hash::flow_hash, snat_timeout,
};

use crate::{
    conntrack,
    flows::{self, Probe},
    maps::{AFFINITY, BACKENDS, CONFIG, FRONTENDS, RINGS},
    parse::Flow,
    stats,
};

/// How many SNAT ports a new flow tries before giving up.
const SNAT_TRIES: u32 = 32;
/// The step between a flow's SNAT port tries: odd and about the golden ratio of 2^32, so the
/// tries of one flow spread over the range (a Weyl sequence) instead of probing neighbours,
/// whose runs of taken ports grow together (at a quarter of the range taken, runs of 8 were
/// common enough to refuse connections).
const SNAT_STEP: u32 = 0x9e37_79b1;

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

#[inline(always)]
pub fn config() -> Option<Config> {
    CONFIG.get(0).copied()
}

/// Whether `addr_be` is one of the node's addresses (`Config::node_addrs_be`).
#[inline(always)]
pub fn is_node_addr(addr_be: u32) -> bool {
    let Some(c) = CONFIG.get(0) else {
        return false;
    };
    let n = (c.node_addr_count as usize).min(c.node_addrs_be.len());
    c.node_addrs_be.iter().take(n).any(|a| *a == addr_be)
}

/// What to do with a packet of a frontend's flow.
pub struct Forward {
    pub backend: Backend,
    pub service_id: u32,
    /// New source (address, port) for SNATed flows.
    pub snat: Option<(u32, u16)>,
    pub verdict: Verdict,
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
///
/// `replies`: whether the packet may be a reply of a flow that was not SNATed. The NIC hook
/// passes false for packets to the node's own addresses: such replies go to clients, which
/// are pods (a node's own processes are balanced at their sockets), and replies to the node
/// are SNATed flows', found in the SNAT map.
#[inline(always)]
pub fn tracked(key: &FlowKey, tcp_flags: u8, replies: bool) -> Tracked {
    let mut overflow = false;
    if let Some(b) = flows::bucket(key.src_be, key.sport_be, key.proto) {
        match flows::forward(b, key) {
            Probe::Hit(p, s) => {
                touch(p, &s, key.proto, tcp_flags, false);
                return match live(s.backend_id, s.backend_generation, key.proto, tcp_flags) {
                    Some(backend) => Tracked::Forward(Forward {
                        backend,
                        service_id: s.service_id,
                        snat: slot_snat(&s),
                        verdict: Verdict::NatEstablished,
                    }),
                    None => Tracked::Untracked,
                };
            }
            Probe::Miss { overflow: o } => overflow = o,
        }
    }
    if replies && let Some(b) = flows::bucket(key.dst_be, key.dport_be, key.proto) {
        match flows::reply(b, key) {
            Probe::Hit(p, s) => {
                touch(p, &s, key.proto, tcp_flags, true);
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
        overflow_tracked(key, tcp_flags)
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
/// (at most one write a second), marks it answered at its first reply, closing at a FIN or
/// RST, and new again at a client's SYN (a new connection on the same 5-tuple). Plain stores
/// of the two fields packets own (`last_seen_s`, `state`): a racing writer that gives the
/// slot to another flow meanwhile can at worst see a newer time or a wrong state, which only
/// changes when the slot may be reused.
#[inline(always)]
fn touch(p: *mut FlowSlot, s: &FlowSlot, proto: u8, tcp_flags: u8, reply: bool) {
    let now = now_s();
    let mut state = s.state;
    if reply {
        state |= FLOW_S_REPLIED;
    }
    if proto == IPPROTO_TCP {
        if tcp_flags & TCP_FIN_RST != 0 {
            state |= FLOW_S_CLOSING;
        } else if !reply && tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
            state &= !(FLOW_S_CLOSING | FLOW_S_REPLIED);
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

/// [`tracked`] for flows in the LRU conntrack map.
#[inline(always)]
fn overflow_tracked(key: &FlowKey, tcp_flags: u8) -> Tracked {
    let Some(ct) = conntrack::lookup(key) else {
        return Tracked::Untracked;
    };
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
        return Tracked::Forward(Forward {
            backend: b,
            service_id: ct.service_id,
            snat,
            verdict: Verdict::NatEstablished,
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
pub fn new_flow(f: &Flow, key: &FlowKey, fe: &Frontend, hook: Hook) -> Result<Forward, Verdict> {
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
    let snat = match hook {
        Hook::Nic if b.flags & BACKEND_F_LOCAL == 0 && fe.flags & FRONTEND_F_SNAT_REMOTE != 0 => {
            Some(reserve_snat(f, &b, h, fe.service_id)?)
        }
        Hook::Pod if b.addr_be == f.src_be => Some(reserve_hairpin(f, &b, fe.service_id)?),
        _ => None,
    };
    let flags = match (hook, snat) {
        (_, None) => 0,
        (Hook::Nic, Some(_)) => FLOW_F_SNAT,
        (Hook::Pod, Some(_)) => FLOW_F_HAIRPIN,
    };
    let slot = FlowSlot {
        client_addr_be: f.src_be,
        frontend_addr_be: f.dst_be,
        peer_addr_be: snat.map_or(b.addr_be, |s| s.0),
        client_port_be: f.sport_be,
        frontend_port_be: f.dport_be,
        backend_port_be: b.port_be,
        nat_port_be: snat.map_or(0, |s| s.1),
        backend_id: id,
        backend_generation: b.generation,
        service_id: fe.service_id,
        last_seen_s: now_s(),
        proto: f.proto,
        flags,
        // SNATed flows' replies are not seen here (see FLOW_S_REPLIED).
        state: if snat.is_some() { FLOW_S_REPLIED } else { 0 },
        _pad: 0,
    };
    record(key, &slot, snat, b.addr_be)?;
    Ok(Forward {
        backend: b,
        service_id: fe.service_id,
        snat,
        verdict: Verdict::NatNew,
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
) -> Result<(), Verdict> {
    let b = flows::bucket(key.src_be, key.sport_be, key.proto).ok_or(Verdict::DropMapFull)?;
    let cfg = CONFIG.get(0);
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

/// Forgets a flow (its SNAT port is being given to another flow). False if its bucket could
/// not be taken, in which case the port must not be reused.
#[inline(always)]
fn forget(key: &FlowKey) -> bool {
    if let Some(b) = flows::bucket(key.src_be, key.sport_be, key.proto) {
        let Some(mut bucket) = flows::Locked::take(b) else {
            return false;
        };
        bucket.remove(key);
    }
    conntrack::remove(key);
    true
}

/// Whether a flow-table flow has been idle longer than its state allows, so its slot may be
/// given to a new flow.
#[inline(always)]
fn slot_expired(s: &FlowSlot, now: u32, cfg: Option<&Config>) -> bool {
    let timeout = if s.state & FLOW_S_CLOSING != 0 {
        or_default(
            cfg.map_or(0, |c| c.snat_timeout_closing_s),
            snat_timeout::CLOSING,
        )
    } else if s.state & FLOW_S_REPLIED == 0 {
        or_default(cfg.map_or(0, |c| c.snat_timeout_new_s), snat_timeout::NEW)
    } else if s.proto == IPPROTO_TCP {
        or_default(
            cfg.map_or(0, |c| c.snat_timeout_tcp_established_s),
            snat_timeout::TCP_ESTABLISHED,
        )
    } else {
        or_default(
            cfg.map_or(0, |c| c.snat_timeout_udp_established_s),
            snat_timeout::UDP_ESTABLISHED,
        )
    };
    now.wrapping_sub(s.last_seen_s) > timeout
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

/// Picks a free SNAT port for a flow to backend `b`, starting where the flow hash points and
/// trying ports spread over the range; the SNAT entry records the client and frontend for the replies.
#[inline(always)]
fn reserve_snat(f: &Flow, b: &Backend, h: u32, service_id: u32) -> Result<(u32, u16), Verdict> {
    let cfg = config().ok_or(Verdict::DropSnatExhausted)?;
    let (min, max) = (u32::from(cfg.snat_port_min), u32::from(cfg.snat_port_max));
    if cfg.snat_addr_be == 0 || min == 0 || max < min {
        return Err(Verdict::DropSnatExhausted);
    }
    let range = max - min + 1;
    let now = now_s();
    let entry = SnatEntry {
        client_addr_be: f.src_be,
        frontend_addr_be: f.dst_be,
        client_port_be: f.sport_be,
        frontend_port_be: f.dport_be,
        service_id,
        last_seen_s: now,
        state: SNAT_NEW,
        _pad: [0; 3],
    };
    for i in 0..SNAT_TRIES {
        let probe = h.wrapping_add(i.wrapping_mul(SNAT_STEP));
        let port = min + probe.checked_rem(range).unwrap_or(0);
        let port_be = (port as u16).to_be();
        let reply: FlowKey =
            conntrack::key(b.addr_be, cfg.snat_addr_be, b.port_be, port_be, f.proto);
        if conntrack::reserve_snat(&reply, &entry).is_ok() {
            return Ok((cfg.snat_addr_be, port_be));
        }
        // Taken: reclaim it if its flow has been idle past its state's timeout.
        if let Some(old) = conntrack::snat_entry(&reply) {
            // SAFETY: the pointer is the map's value; a racing writer can at worst make the
            // expiry check see a newer time and skip this port.
            let stale = unsafe { *old };
            if expired(&stale, now, &cfg, f.proto) {
                let owner = conntrack::key(
                    stale.client_addr_be,
                    stale.frontend_addr_be,
                    stale.client_port_be,
                    stale.frontend_port_be,
                    f.proto,
                );
                if !forget(&owner) {
                    continue;
                }
                // SAFETY: as above; the whole value is replaced.
                unsafe { *old = entry };
                return Ok((cfg.snat_addr_be, port_be));
            }
        }
    }
    Err(Verdict::DropSnatExhausted)
}

/// Coarse seconds since boot.
#[inline(always)]
fn now_s() -> u32 {
    // SAFETY: plain helper call.
    (unsafe { bpf_ktime_get_coarse_ns() } / 1_000_000_000) as u32
}

#[inline(always)]
fn or_default(configured: u32, default: u32) -> u32 {
    if configured == 0 { default } else { configured }
}

/// Whether a SNAT entry's flow has been idle longer than its state allows.
#[inline(always)]
fn expired(e: &SnatEntry, now: u32, cfg: &Config, proto: u8) -> bool {
    let timeout = match e.state {
        SNAT_NEW => or_default(cfg.snat_timeout_new_s, snat_timeout::NEW),
        SNAT_CLOSING => or_default(cfg.snat_timeout_closing_s, snat_timeout::CLOSING),
        _ if proto == IPPROTO_TCP => or_default(
            cfg.snat_timeout_tcp_established_s,
            snat_timeout::TCP_ESTABLISHED,
        ),
        _ => or_default(
            cfg.snat_timeout_udp_established_s,
            snat_timeout::UDP_ESTABLISHED,
        ),
    };
    now.wrapping_sub(e.last_seen_s) > timeout
}

const TCP_FIN_RST: u8 = 0x01 | 0x04;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

/// Notes a packet of a SNATed flow in its SNAT entry: a reply makes it established and
/// refreshes it (at most one write a second), a FIN or RST in either direction marks it
/// closing.
#[inline(always)]
pub fn touch_snat(e: *mut SnatEntry, f: &Flow, reply: bool) {
    let now = now_s();
    // SAFETY: `e` points at a SNAT map value; plain integer fields.
    unsafe {
        if f.tcp_flags & TCP_FIN_RST != 0 {
            if (*e).state != SNAT_CLOSING || (*e).last_seen_s != now {
                (*e).state = SNAT_CLOSING;
                (*e).last_seen_s = now;
            }
        } else if reply && (*e).state != SNAT_CLOSING {
            if (*e).state == SNAT_NEW {
                (*e).state = SNAT_ESTABLISHED;
            }
            if (*e).last_seen_s != now {
                (*e).last_seen_s = now;
            }
        }
    }
}

/// A FIN or RST of an established SNATed flow (client side): marks its SNAT entry closing.
#[inline(always)]
pub fn snat_forward_closing(f: &Flow, fwd: &Forward) {
    if f.tcp_flags & TCP_FIN_RST == 0 {
        return;
    }
    if let Some((addr, port)) = fwd.snat {
        let reply = conntrack::key(
            fwd.backend.addr_be,
            addr,
            fwd.backend.port_be,
            port,
            f.proto,
        );
        if let Some(e) = conntrack::snat_entry(&reply) {
            touch_snat(e, f, false);
        }
    }
}

/// A pod reaching itself: its packets come back from `HAIRPIN_ADDR` with its own source
/// port (unique among its own connections), so the reply tuple is free by construction.
#[inline(always)]
fn reserve_hairpin(f: &Flow, b: &Backend, service_id: u32) -> Result<(u32, u16), Verdict> {
    let hairpin = u32::from_ne_bytes(HAIRPIN_ADDR);
    let reply = conntrack::key(b.addr_be, hairpin, b.port_be, f.sport_be, f.proto);
    let entry = SnatEntry {
        client_addr_be: f.src_be,
        frontend_addr_be: f.dst_be,
        client_port_be: f.sport_be,
        frontend_port_be: f.dport_be,
        service_id,
        last_seen_s: now_s(),
        state: SNAT_NEW,
        _pad: [0; 3],
    };
    conntrack::put_snat(&reply, &entry).map_err(|_| Verdict::DropMapFull)?;
    Ok((hairpin, f.sport_be))
}

/// How a reply must be rewritten: new source, and for SNATed flows a new destination.
pub struct Reverse {
    pub src: (u32, u16),
    pub dst: Option<(u32, u16)>,
    pub service_id: u32,
}

/// Looks up an untracked packet `f` (conntrack key `key`) as a reply of a SNATed flow: it
/// arrives at the SNAT address on a port of the SNAT range, or at the hairpin address.
#[inline(always)]
pub fn snat_reply(f: &Flow, key: &FlowKey, cfg: Option<&Config>) -> Option<Reverse> {
    let port = u16::from_be(f.dport_be);
    let to_snat_port = cfg.is_some_and(|c| {
        f.dst_be == c.snat_addr_be && port >= c.snat_port_min && port <= c.snat_port_max
    });
    if !to_snat_port && f.dst_be != u32::from_ne_bytes(HAIRPIN_ADDR) {
        return None;
    }
    let e = conntrack::snat_entry(key)?;
    touch_snat(e, f, true);
    // SAFETY: a SNAT map value, copied out.
    let s = unsafe { *e };
    Some(Reverse {
        src: (s.frontend_addr_be, s.frontend_port_be),
        dst: Some((s.client_addr_be, s.client_port_be)),
        service_id: s.service_id,
    })
}
