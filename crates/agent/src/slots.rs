//! Slots counted per key (a uid, a process, a source address) and in all:
//! a flood from one key cannot take what every other key needs. A slot is
//! held until it is dropped.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

pub struct KeyedSlots<K> {
    per_key: usize,
    total: usize,
    /// (slots held in all, slots held per key; keys with none are absent).
    held: Mutex<(usize, HashMap<K, usize>)>,
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
        })
    }

    /// A slot for `key`, or None when the key or the whole has none left.
    pub fn take(self: &Arc<Self>, key: K) -> Option<KeyedSlot<K>> {
        let mut g = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let (total, per_key) = &mut *g;
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
        let mut g = self.slots.held.lock().unwrap_or_else(|p| p.into_inner());
        let (total, per_key) = &mut *g;
        *total = total.saturating_sub(1);
        if let Some(n) = per_key.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                per_key.remove(&self.key);
            }
        }
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
}
