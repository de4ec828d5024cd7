//! Slots counted per key (a uid, a process, a source address) and in all:
//! a flood from one key cannot take what every other key needs. A slot is
//! held until it is dropped. Used for executable hashing here and for the
//! agent's connection caps.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;

pub struct KeyedSlots<K> {
    per_key: usize,
    total: usize,
    /// (slots held in all, slots held per key; keys with none are absent).
    held: Mutex<(usize, HashMap<K, usize>)>,
    freed: Condvar,
}

/// One slot of `key`, given back on drop.
pub struct KeyedSlot<K: Eq + Hash + Copy> {
    slots: Arc<KeyedSlots<K>>,
    key: K,
}

impl<K: Eq + Hash + Copy> KeyedSlots<K> {
    /// At most `per_key` slots for one key and `total` in all.
    pub fn new(per_key: usize, total: usize) -> Arc<Self> {
        Arc::new(KeyedSlots {
            per_key,
            total,
            held: Mutex::new((0, HashMap::new())),
            freed: Condvar::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, (usize, HashMap<K, usize>)> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A slot for `key`, or None when the key or the whole has none left.
    pub fn take(self: &Arc<Self>, key: K) -> Option<KeyedSlot<K>> {
        self.take_locked(&mut self.lock(), key)
    }

    /// As [`take`](Self::take), waiting (blocking the thread) for a slot
    /// to be freed until `deadline`.
    pub fn take_until(self: &Arc<Self>, key: K, deadline: Instant) -> Option<KeyedSlot<K>> {
        let mut g = self.lock();
        loop {
            if let Some(s) = self.take_locked(&mut g, key) {
                return Some(s);
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            g = self
                .freed
                .wait_timeout(g, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    fn take_locked(
        self: &Arc<Self>,
        held: &mut (usize, HashMap<K, usize>),
        key: K,
    ) -> Option<KeyedSlot<K>> {
        let (total, per_key) = held;
        let mine = per_key.get(&key).copied().unwrap_or(0);
        if *total >= self.total || mine >= self.per_key {
            return None;
        }
        *total += 1;
        per_key.insert(key, mine + 1);
        Some(KeyedSlot {
            slots: self.clone(),
            key,
        })
    }
}

impl<K: Eq + Hash + Copy> Drop for KeyedSlot<K> {
    fn drop(&mut self) {
        let mut g = self.slots.lock();
        let (total, per_key) = &mut *g;
        *total = total.saturating_sub(1);
        if let Some(n) = per_key.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                per_key.remove(&self.key);
            }
        }
        drop(g);
        self.slots.freed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_and_the_whole_are_bounded_and_slots_come_back() {
        let s = KeyedSlots::new(2, 3);
        let a1 = s.take(1).expect("a1");
        let _a2 = s.take(1).expect("a2");
        assert!(s.take(1).is_none(), "a third for key 1");
        let _b1 = s.take(2).expect("b1");
        assert!(s.take(3).is_none(), "a fourth in all");
        drop(a1);
        assert!(s.take(3).is_some(), "a slot came back");
        assert!(s.take(1).is_some(), "key 1 has one again");
    }

    #[test]
    fn waiting_for_a_slot_is_bounded_and_ends_when_one_is_freed() {
        let s = KeyedSlots::new(1, 2);
        let soon = || Instant::now() + std::time::Duration::from_millis(50);
        let a = s.take_until(7, soon()).expect("first slot");
        // Key 7 holds its one slot: a second waits, then gives up.
        assert!(s.take_until(7, soon()).is_none());
        // Another key gets the second slot; a third key none.
        let b = s.take_until(8, soon()).expect("other key");
        assert!(s.take_until(9, Instant::now()).is_none());
        // Freed while a thread waits: the waiter gets it.
        let waiter = {
            let s = s.clone();
            std::thread::spawn(move || {
                s.take_until(9, Instant::now() + std::time::Duration::from_secs(10))
                    .is_some()
            })
        };
        std::thread::sleep(std::time::Duration::from_millis(20));
        drop(a);
        assert!(waiter.join().expect("waiter"));
        drop(b);
    }
}
