//! The store that sources fill and the agent's sync loop reads. A source changes it under the
//! lock (a re-list replaces a whole kind at once, never object by object) and bumps its
//! generation; the sync loop waits for a generation it has not seen, then debounces.
//! Readiness: the agent programs nothing before every registered source finished its first
//! full listing, so a restart never programs a partial picture. The store also remembers when
//! the oldest change not yet taken by a sync happened: the start of kube-proxy's "network
//! programming" latency, and hands the keys of the objects changed since the previous sync
//! ([`Changes`]) to the sync that reads them.
use std::{
    collections::BTreeMap,
    sync::{Mutex, MutexGuard, PoisonError},
    time::Instant,
};

use tokio::sync::watch;

use crate::control::{
    invalid::Invalid,
    store::{Changes, Store},
};

#[derive(Default)]
struct Inner {
    store: Store,
    /// Source name → finished its first full listing.
    synced: BTreeMap<&'static str, bool>,
    /// Objects a source could not even parse (the model reports the rest).
    invalid: BTreeMap<&'static str, Vec<Invalid>>,
    /// When the oldest change that no [`SharedStore::read_changes`] has taken yet happened.
    changed_since: Option<Instant>,
}

/// A [`Store`] shared between sources and the sync loop.
pub struct SharedStore {
    inner: Mutex<Inner>,
    generation: watch::Sender<u64>,
}

impl Default for SharedStore {
    fn default() -> Self {
        Self::new()
    }
}

impl SharedStore {
    #[must_use]
    pub fn new() -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            generation: watch::Sender::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Declares a source whose first full listing readiness waits for.
    pub fn register(&self, source: &'static str) {
        self.lock().synced.entry(source).or_insert(false);
    }

    /// Changes the store and wakes the sync loop.
    pub fn update<R>(&self, f: impl FnOnce(&mut Store) -> R) -> R {
        let r = {
            let mut inner = self.lock();
            inner.changed_since.get_or_insert_with(Instant::now);
            f(&mut inner.store)
        };
        self.generation.send_modify(|g| *g += 1);
        r
    }

    /// Changes the store together with the objects `source` could not parse (a watch keeps its
    /// refusals up to date object by object), under one lock, and wakes the sync loop.
    pub fn update_source<R>(
        &self,
        source: &'static str,
        f: impl FnOnce(&mut Store, &mut Vec<Invalid>) -> R,
    ) -> R {
        let r = {
            let mut inner = self.lock();
            let inner = &mut *inner;
            inner.changed_since.get_or_insert_with(Instant::now);
            f(&mut inner.store, inner.invalid.entry(source).or_default())
        };
        self.generation.send_modify(|g| *g += 1);
        r
    }

    /// Replaces the whole store (a source that re-reads everything, like manifest files),
    /// with the objects it could not parse, and marks the source synced. Only the objects that
    /// differ count as changed.
    pub fn replace(&self, source: &'static str, store: Store, invalid: Vec<Invalid>) {
        {
            let mut inner = self.lock();
            inner.changed_since.get_or_insert_with(Instant::now);
            inner.store.assign(store);
            inner.invalid.insert(source, invalid);
            inner.synced.insert(source, true);
        }
        self.generation.send_modify(|g| *g += 1);
    }

    /// Marks `source` as having finished a full listing (wakes the sync loop).
    pub fn set_synced(&self, source: &'static str) {
        {
            let mut inner = self.lock();
            inner.changed_since.get_or_insert_with(Instant::now);
            inner.synced.insert(source, true);
        }
        self.generation.send_modify(|g| *g += 1);
    }

    /// Every registered source has finished its first full listing.
    #[must_use]
    pub fn is_synced(&self) -> bool {
        self.lock().synced.values().all(|s| *s)
    }

    /// Reads the store (and the sources' parse failures) under the lock.
    pub fn read<R>(&self, f: impl FnOnce(&Store, &[Invalid]) -> R) -> R {
        let inner = self.lock();
        let invalid: Vec<Invalid> = inner.invalid.values().flatten().cloned().collect();
        f(&inner.store, &invalid)
    }

    /// Like [`SharedStore::read`], and takes the keys of the objects changed since the previous
    /// call and the time of the oldest change (`None`: nothing changed since), under the same
    /// lock: whatever `f` reads includes every change up to that time.
    pub fn read_changes<R>(
        &self,
        f: impl FnOnce(&Store, &Changes, &[Invalid]) -> R,
    ) -> (R, Option<Instant>) {
        let mut inner = self.lock();
        let since = inner.changed_since.take();
        let changes = inner.store.take_changes();
        let invalid: Vec<Invalid> = inner.invalid.values().flatten().cloned().collect();
        (f(&inner.store, &changes, &invalid), since)
    }

    /// The current generation (bumped by every change).
    #[must_use]
    pub fn generation(&self) -> u64 {
        *self.generation.borrow()
    }

    /// A receiver that wakes on every change.
    #[must_use]
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::SharedStore;
    use crate::control::store::Store;

    #[test]
    fn ready_only_when_every_source_listed_once() {
        let s = SharedStore::new();
        s.register("manifests");
        s.register("kube");
        assert!(!s.is_synced());
        s.replace("manifests", Store::new(), Vec::new());
        assert!(!s.is_synced());
        s.set_synced("kube");
        assert!(s.is_synced());
        assert_eq!(s.generation(), 2);
    }

    #[test]
    fn read_changes_takes_the_oldest_change_once() {
        let s = SharedStore::new();
        assert_eq!(s.read_changes(|_, _, _| ()).1, None);
        s.update(|_| ());
        let first = s.read_changes(|_, _, _| ()).1.expect("a change");
        assert_eq!(s.read_changes(|_, _, _| ()).1, None, "taken");
        s.update(|_| ());
        s.set_synced("kube");
        let second = s.read_changes(|_, _, _| ()).1.expect("a change");
        assert!(second >= first);
        // The oldest of the two changes is kept, not the newest.
        s.update(|_| ());
        std::thread::sleep(std::time::Duration::from_millis(5));
        s.update(|_| ());
        let since = s.read_changes(|_, _, _| ()).1.expect("a change");
        assert!(since.elapsed() >= std::time::Duration::from_millis(5));
    }
}
