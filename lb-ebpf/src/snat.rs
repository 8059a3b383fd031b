//! The SNAT table (see `lb_common::NatBucket`): SNATed and hairpin flows by their reply
//! tuple. Its entries restore the client and frontend on replies, and reserve the SNAT port
//! for their backend while the flow lives and for its close timeout after.
//!
//! Port choice: each backend (by id) has a cursor, and a new flow takes the first port from
//! it that no live flow to that backend holds, then moves the cursor past it. A backend's
//! ports therefore come round in order, the one used longest ago first, so a (SNAT port,
//! backend) tuple is reused as late as the range allows; and its buckets are consecutive
//! (`hash::nat_bucket`), so a new flow touches memory its predecessor just touched. When a
//! run of live flows follows the cursor, the tries spread over the range from the flow hash.
//! Whether an old entry may be taken is decided by its flow's state and `lb_common::timeout`
//! (why each timeout is safe is said there).
//!
//! The legacy LRU SNAT map holds the flows of a datapath of layout version 1 after an
//! upgrade (`CONFIG_F_SNAT_LEGACY`); its entries are read and refreshed as that datapath did.
use core::ptr::{addr_of, addr_of_mut, read_volatile};

use aya_ebpf::{macros::map, maps::PerCpuArray};
use lb_common::{
    CONFIG_F_SNAT_LEGACY, CONFIG_F_SNAT_LEGACY_TOO, Config, Event, FLOW_WAYS, FlowKey, IPPROTO_TCP,
    NAT_B_FIN, NAT_B_PASSIVE, NAT_B_REPLIED, NAT_B_RST, NAT_B_SYN, NAT_C_FIN, NAT_C_RST, NatBucket,
    NatEntry, SNAT_CLOSING, SNAT_ESTABLISHED, SNAT_NEW, SnatEntry, Timeouts, capacity,
    hash::nat_bucket, snat_port_at,
};

use crate::{
    conntrack,
    maps::{CONFIG, NAT, NAT_CURSORS, NAT_EXCLUDED, SNAT_LEGACY},
    seqlock, stats,
};

/// The table's bucket count minus one (a power of two minus one); the agent sets it at load
/// time to match the map's size.
#[unsafe(no_mangle)]
static NAT_BUCKET_MASK: u32 = capacity::NAT_BUCKETS - 1;

/// Ports a new flow tries one after another from its backend's cursor.
const SEQ_TRIES: u32 = 8;
/// Ports it then tries spread over the range from the flow hash (past a long run of live
/// flows after the cursor).
const SPREAD_TRIES: u32 = 8;
/// The step between spread tries: odd and about the golden ratio of 2^32 (a Weyl sequence).
const SPREAD_STEP: u32 = 0x9e37_79b1;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// The bucket of reply tuple `k` (backend → SNAT address and port).
#[inline(always)]
fn bucket(k: &FlowKey) -> Option<*mut NatBucket> {
    // SAFETY: a plain read of a constant the loader may have rewritten.
    let mask = unsafe { read_volatile(addr_of!(NAT_BUCKET_MASK)) };
    let base = nat_bucket(k.src_be, k.sport_be, k.proto, k.dst_be);
    NAT.get_ptr_mut(base.wrapping_add(u32::from(u16::from_be(k.dport_be))) & mask)
}

#[inline(always)]
fn header(b: *mut NatBucket) -> *mut u64 {
    // SAFETY: `b` points at a bucket of the SNAT table (a map value).
    unsafe { addr_of_mut!((*b).header) }
}

#[inline(always)]
fn entry_at(b: *mut NatBucket, i: usize) -> *mut NatEntry {
    // SAFETY: `b` is a map value; callers pass `i < FLOW_WAYS`.
    unsafe { addr_of_mut!((*b).entries[i]) }
}

/// Whether entry `e` is the flow of reply tuple `k`.
#[inline(always)]
fn is_reply_of(e: &NatEntry, k: &FlowKey) -> bool {
    e.nat_addr_be == k.dst_be
        && e.nat_port_be == k.dport_be
        && e.backend_addr_be == k.src_be
        && e.backend_port_be == k.sport_be
        && e.proto == k.proto
}

/// The entry of reply tuple `k`: a pointer for refreshing it, and a consistent copy.
#[inline(always)]
pub fn find(k: &FlowKey) -> Option<(*mut NatEntry, NatEntry)> {
    let b = bucket(k)?;
    let read = seqlock::read(header(b), || {
        for i in 0..FLOW_WAYS {
            let p = entry_at(b, i);
            // SAFETY: a map value; plain loads between the header reads (see `seqlock`).
            let e = unsafe { &*p };
            if e.nat_addr_be != 0 && is_reply_of(e, k) {
                return Some((p, *e));
            }
        }
        None
    });
    read.and_then(|(hit, _)| hit)
}

/// Whether entry `e` is free, or its flow has been idle past its state's timeout.
#[inline(always)]
pub fn expired(e: &NatEntry, now: u32, t: &Timeouts) -> bool {
    e.expired(now, t)
}

/// Whether entry `e`'s flow is over: a FIN or RST either way.
#[inline(always)]
pub fn closing(e: &NatEntry) -> bool {
    e.client_state & (NAT_C_FIN | NAT_C_RST) != 0 || e.backend_state & (NAT_B_FIN | NAT_B_RST) != 0
}

/// Whether a client's SYN on entry `e`'s flow starts a new connection (the old one was
/// established and is over) rather than retrying its connect (see `NAT_B_SYN`).
#[inline(always)]
pub fn restarts(e: &NatEntry) -> bool {
    closing(e) && e.backend_state & NAT_B_SYN != 0
}

/// A retried connect on entry `p` (a client's SYN on a flow the backend never answered with
/// a SYN-ACK, reset since): the entry starts over as a new attempt on the same port.
#[inline(always)]
pub fn retry(p: *mut NatEntry, now: u32) {
    // SAFETY: `p` is a SNAT-table entry. Both state bytes, though the backend's packets own
    // one: nothing of this flow is in flight from the backend once the client reset it.
    unsafe {
        (*p).client_state = 0;
        (*p).backend_state = 0;
        (*p).last_seen_s = now;
    }
}

/// Which of a tuple's own entries [`take`] may write over.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Over {
    /// Only one whose time is over.
    Expired,
    /// Also one whose flow is finished, its close time running (see [`reserve`]).
    Finished,
    /// Any (a hairpin tuple, unique by construction).
    Any,
}

/// How a tuple's own entry stood in [`take`]: `FINISHED_OTHER` / `FINISHED_SAME`, a finished
/// flow of another client or of the new flow's client (whose TCP timestamps, if it sends
/// them, are newer than its old connection's: the backend accepts a SYN on a tuple in
/// `TIME_WAIT` then, RFC 6191).
const FINISHED_OTHER: u32 = 1;
const FINISHED_SAME: u32 = 2;

/// Writes `entry` (reply tuple `key`) into its bucket: over the tuple's own entry as `over`
/// allows, else into a free entry, else over another flow's entry whose time is over. False
/// if a live flow holds the tuple, the bucket is full of live flows, or another writer holds
/// it. The entry taken over is copied to `previous` (free: none was); `own` says whether the
/// tuple's own entry, when it was not taken, is a finished flow's (`FINISHED_*`, else 0).
#[inline(always)]
fn take(
    key: &FlowKey,
    entry: &NatEntry,
    timeouts: &Timeouts,
    over: Over,
    previous: &mut NatEntry,
    own: &mut u32,
) -> bool {
    *own = 0;
    let Some(b) = bucket(key) else {
        return false;
    };
    // One try: a bucket another writer holds sends the flow on to its next port.
    let Some(taken) = seqlock::try_lock(header(b)) else {
        return false;
    };
    let now = entry.last_seen_s;
    // The entry to write: 3 = the tuple's own, 2 = a free one, 1 = another's expired one.
    let (mut pick, mut rank, mut own_held) = (0usize, 0u8, false);
    for i in 0..FLOW_WAYS {
        // SAFETY: the bucket is ours.
        let e = unsafe { &*entry_at(b, i) };
        let r = if e.nat_addr_be == 0 {
            2
        } else if is_reply_of(e, key) {
            let finished = e.finished();
            own_held = match over {
                Over::Any => false,
                Over::Finished => !finished && !expired(e, now, timeouts),
                Over::Expired => !expired(e, now, timeouts),
            };
            if own_held && finished {
                *own = if e.client_addr_be == entry.client_addr_be {
                    FINISHED_SAME
                } else {
                    FINISHED_OTHER
                };
            }
            3
        } else {
            u8::from(expired(e, now, timeouts))
        };
        if r > rank {
            (pick, rank) = (i, r);
        }
    }
    let done = rank != 0 && !own_held;
    if done {
        *own = 0;
        let p = entry_at(b, pick);
        // SAFETY: the bucket is ours; `pick` is in bounds.
        unsafe {
            *previous = *p;
            *p = *entry;
        }
    }
    seqlock::unlock(header(b), taken, 0);
    done
}

/// Whether the agent excluded `port` from new SNATed flows (a frontend or a socket of the
/// node uses it, or the previous datapath's flows may).
#[inline(always)]
fn excluded(port: u16) -> bool {
    NAT_EXCLUDED
        .get(u32::from(port >> 6))
        .is_some_and(|w| w & (1u64 << (port & 63)) != 0)
}

/// The reply tuple of a flow SNATed to `nat` to backend `backend`.
#[inline(always)]
pub fn reply_key(backend: (u32, u16), nat: (u32, u16), proto: u8) -> FlowKey {
    conntrack::key(backend.0, nat.0, backend.1, nat.1, proto)
}

/// A port reserved for a new SNATed flow, and the flow whose time-out entry it took over
/// (whose flow-table slot the caller forgets).
pub struct Reserved {
    pub port_be: u16,
    pub previous: Option<NatEntry>,
}

/// Reserves a SNAT port for new flow `entry` (client and frontend filled in) to backend
/// `backend_id`; `h` is the flow hash. See the module's note on the choice.
#[inline(always)]
pub fn reserve(entry: &NatEntry, backend_id: u32, cfg: &Config, h: u32) -> Option<Reserved> {
    let legacy_too = cfg.flags & CONFIG_F_SNAT_LEGACY_TOO != 0;
    let n = if legacy_too {
        cfg.legacy_ports.len()
    } else {
        cfg.snat_port_count
    };
    if cfg.snat_addr_be == 0 || n == 0 {
        return None;
    }
    let cursor = NAT_CURSORS.get_ptr_mut(backend_id);
    // SAFETY: the map's value; racing writers can at worst make two flows try one port,
    // which the bucket lock gives to one of them.
    let start = cursor.map_or(0, |c| unsafe { *c });
    // In this CPU's work area, not on the stack (the BPF stack is 512 bytes).
    let tries = TRIES.get_ptr_mut(0)?;
    // SAFETY: this CPU's entry; a program runs to its end on one CPU.
    let tries = unsafe { &mut *tries };
    // Field by field: a struct literal would be built on the stack first.
    tries.entry = *entry;
    tries.previous.nat_addr_be = 0;
    tries.start = if start == 0 { h } else { start };
    tries.hash = h;
    tries.count = n;
    tries.legacy_too = u32::from(legacy_too);
    tries.taken_index = 0;
    tries.taken = 0;
    tries.early = 0;
    tries.early_rank = 0;
    tries.early_index = 0;
    run_tries();
    if tries.early != 0 && tries.taken != 0 {
        stats::event(Event::SnatPortTakenEarly);
    }
    if tries.taken == 0 {
        return None;
    }
    if let Some(c) = cursor {
        // SAFETY: as above.
        unsafe { *c = tries.taken_index.wrapping_add(1) };
    }
    Some(Reserved {
        port_be: tries.entry.nat_port_be,
        previous: (tries.previous.nat_addr_be != 0).then_some(tries.previous),
    })
}

/// A new flow's port tries, per CPU (a work area: no program reads another's).
#[map(name = "xlb_nat_tries")]
static TRIES: PerCpuArray<Tries> = PerCpuArray::with_max_entries(1, 0);

/// The state of a new flow's port tries.
#[repr(C)]
pub struct Tries {
    /// The new flow's entry; its port is the one taken, when `taken` is 1.
    entry: NatEntry,
    /// The expired flow whose entry was taken over (free: none).
    previous: NatEntry,
    start: u32,
    hash: u32,
    count: u32,
    legacy_too: u32,
    /// The index (in the ranges) of the port taken.
    taken_index: u32,
    taken: u32,
    /// 1: this try may take a finished flow's port early (`Over::Finished`).
    early: u32,
    /// The best port to take early (`FINISHED_*`, 0: none) and its index.
    early_rank: u32,
    early_index: u32,
    /// The reply tuple of the port being tried, and its legacy map entry.
    key: FlowKey,
    legacy: SnatEntry,
}

/// Runs `try_port` for each try until one takes a port: as a `bpf_loop` callback, which the
/// verifier checks once instead of once per try (its context is this CPU's work area, which
/// the callback finds itself: `bpf_loop` passes only stack pointers).
#[inline(always)]
fn run_tries() {
    #[cfg(target_arch = "bpf")]
    {
        use aya_ebpf::helpers::bpf_loop;
        // SAFETY: the callback has bpf_loop's signature and takes no context.
        unsafe {
            bpf_loop(
                SEQ_TRIES + SPREAD_TRIES + 1,
                try_port_callback as *mut core::ffi::c_void,
                core::ptr::null_mut(),
                0,
            );
        }
    }
    #[cfg(not(target_arch = "bpf"))]
    for i in 0..=SEQ_TRIES + SPREAD_TRIES {
        if try_port_callback(u64::from(i), core::ptr::null_mut()) != 0 {
            break;
        }
    }
}

/// `bpf_loop`'s callback: try `i` on this CPU's work area; 1 stops the loop.
extern "C" fn try_port_callback(i: u64, _ctx: *mut core::ffi::c_void) -> i64 {
    let Some(t) = TRIES.get_ptr_mut(0) else {
        return 1;
    };
    // SAFETY: this CPU's work area, which `reserve` filled; a program runs to its end on one
    // CPU.
    i64::from(try_port(i as u32, unsafe { &mut *t }))
}

/// Try `i` of a new flow's port (see [`reserve`]): the `i`-th port after its backend's cursor
/// for the first `SEQ_TRIES`, then ports spread from the flow hash, then (the last) a
/// finished flow's port early. True (stop) once a port is taken.
#[inline(always)]
fn try_port(i: u32, t: &mut Tries) -> bool {
    if i == SEQ_TRIES + SPREAD_TRIES {
        // Every port tried is held. Rather than refuse the connection (the client would
        // retry in a second, and again, until ports come back, which for a burst that took
        // the whole range is a minute), take the port of a flow that is over but whose close
        // time runs, the one that finished longest ago: as kube-proxy's NAT reuses a tuple
        // in TIME_WAIT. The backend accepts the SYN if the client's timestamps or sequence
        // numbers are newer than its old connection's (a client's own old port: so those
        // first); else it answers with an ACK, the client resets it and retransmits its SYN.
        // Never with the older datapath's programs about (its map decides then).
        if t.early_rank == 0 || t.legacy_too != 0 {
            return true;
        }
        t.early = 1;
        return try_index(t.early_index, t);
    }
    let idx = if i < SEQ_TRIES {
        t.start.wrapping_add(i)
    } else {
        t.hash
            .wrapping_add((i - SEQ_TRIES + 1).wrapping_mul(SPREAD_STEP))
    }
    .checked_rem(t.count)
    .unwrap_or(0);
    try_index(idx, t)
}

/// Tries the port with index `idx` (in the ranges) for the flow of `t`.
#[inline(always)]
fn try_index(idx: u32, t: &mut Tries) -> bool {
    let Some(cfg) = CONFIG.get(0) else {
        return true;
    };
    let legacy_too = t.legacy_too != 0;
    let port = if legacy_too {
        // The older datapath's range, as it is: it skips nothing.
        Some(cfg.legacy_ports.min.wrapping_add(idx as u16))
    } else {
        snat_port_at(&cfg.snat_ranges, idx).filter(|p| !excluded(*p))
    };
    let Some(port) = port else {
        return false;
    };
    t.entry.nat_port_be = port.to_be();
    // In the work area, as everything of some size here: the callback's frame adds to the
    // program's, and all frames share 512 bytes.
    t.key = reply_key(
        (t.entry.backend_addr_be, t.entry.backend_port_be),
        (t.entry.nat_addr_be, t.entry.nat_port_be),
        t.entry.proto,
    );
    // While the older datapath may run, its map decides who gets a port: it reserves ports
    // there itself and knows nothing of this table.
    if legacy_too && !legacy_reserve(t) {
        return false;
    }
    let over = if t.early != 0 {
        Over::Finished
    } else {
        Over::Expired
    };
    let mut own = 0;
    if take(
        &t.key,
        &t.entry,
        &cfg.timeouts,
        over,
        &mut t.previous,
        &mut own,
    ) {
        t.taken_index = idx;
        t.taken = 1;
        return true;
    }
    // The first finished flow's port after the cursor (the one that finished longest ago),
    // of this client if there is one: the port to take early if none is free.
    if own > t.early_rank {
        t.early_rank = own;
        t.early_index = idx;
    }
    if legacy_too {
        #[expect(
            clippy::needless_borrows_for_generic_args,
            reason = "a copy would take stack the callback does not have"
        )]
        let _ = SNAT_LEGACY.remove(&t.key);
    }
    false
}

/// Records hairpin flow `entry`, whose reply tuple is unique by construction (the pod's own
/// source port): over the tuple's old entry whatever its state.
#[inline(always)]
pub fn put_hairpin(entry: &NatEntry, t: &Timeouts) -> bool {
    let k = reply_key(
        (entry.backend_addr_be, entry.backend_port_be),
        (entry.nat_addr_be, entry.nat_port_be),
        entry.proto,
    );
    let (mut previous, mut own) = (NatEntry::default(), 0);
    take(&k, entry, t, Over::Any, &mut previous, &mut own)
}

/// Notes a reply (the backend's packet) in its entry: answered, a FIN (a passive close if
/// the client's came first) or a RST, and the time (at most one write a second).
#[inline(always)]
pub fn touch_reply(p: *mut NatEntry, e: &NatEntry, tcp_flags: u8, now: u32) {
    let mut b = e.backend_state | NAT_B_REPLIED;
    if e.proto == IPPROTO_TCP {
        if tcp_flags & TCP_RST != 0 {
            b |= NAT_B_RST;
        }
        if tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK {
            b |= NAT_B_SYN;
        }
        if tcp_flags & TCP_FIN != 0 && b & NAT_B_FIN == 0 {
            b |= NAT_B_FIN;
            if e.client_state & NAT_C_FIN != 0 {
                b |= NAT_B_PASSIVE;
            }
        }
    }
    // SAFETY: `p` is a SNAT-table entry; the backend's packets own these bytes.
    unsafe {
        if b != e.backend_state {
            (*p).backend_state = b;
        }
        if e.last_seen_s != now {
            (*p).last_seen_s = now;
        }
    }
}

/// Notes a client's packet in its entry: a FIN or RST, and the time.
#[inline(always)]
pub fn touch_forward(p: *mut NatEntry, e: &NatEntry, tcp_flags: u8, now: u32) {
    let mut c = e.client_state;
    if e.proto == IPPROTO_TCP {
        if tcp_flags & TCP_RST != 0 {
            c |= NAT_C_RST;
        }
        if tcp_flags & TCP_FIN != 0 {
            c |= NAT_C_FIN;
        }
    }
    // SAFETY: `p` is a SNAT-table entry; the client's packets own these bytes.
    unsafe {
        if c != e.client_state {
            (*p).client_state = c;
        }
        if e.last_seen_s != now {
            (*p).last_seen_s = now;
        }
    }
}

/// The legacy map's entry of reply tuple `k`, if that map is in use.
#[inline(always)]
pub fn legacy_find(k: &FlowKey, cfg: &Config) -> Option<*mut SnatEntry> {
    if cfg.flags & CONFIG_F_SNAT_LEGACY == 0 {
        return None;
    }
    SNAT_LEGACY.get_ptr_mut(k)
}

/// Reserves the tuple of try `t` in the legacy map for its flow (the older datapath's
/// programs may run): false if one of them, or a flow of theirs, has it.
#[inline(always)]
fn legacy_reserve(t: &mut Tries) -> bool {
    const BPF_NOEXIST: u64 = 1;
    let e = &t.entry;
    t.legacy = SnatEntry {
        client_addr_be: e.client_addr_be,
        frontend_addr_be: e.frontend_addr_be,
        client_port_be: e.client_port_be,
        frontend_port_be: e.frontend_port_be,
        service_id: e.service_id,
        last_seen_s: e.last_seen_s,
        state: SNAT_NEW,
        _pad: [0; 3],
    };
    #[expect(
        clippy::needless_borrows_for_generic_args,
        reason = "a copy would take stack the callback does not have"
    )]
    let inserted = SNAT_LEGACY.insert(&t.key, &t.legacy, BPF_NOEXIST);
    inserted.is_ok()
}

/// Notes a packet of a legacy entry's flow as the older datapath did: a reply makes it
/// established and refreshes it (at most one write a second), a FIN or RST in either
/// direction marks it closing.
#[inline(always)]
pub fn legacy_touch(e: *mut SnatEntry, tcp_flags: u8, reply: bool, now: u32) {
    // SAFETY: `e` points at a legacy SNAT map value; plain integer fields.
    unsafe {
        if tcp_flags & (TCP_FIN | TCP_RST) != 0 {
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
