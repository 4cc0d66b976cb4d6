//! Maps keyed by what clients send (rate-limit keys, affinity values), bounded so that no stream
//! of distinct values can grow memory without limit: a value longer than `MAX_KEY_BYTES` stands
//! as its SHA-256, and a map keeps at most its capacity, the least recently used entry evicted
//! first, evictions counted. Knows nothing of HTTP, routes or Redis.

use std::borrow::Cow;
use std::hash::Hash;

use lru::LruCache;

/// Longer client-supplied key values are replaced by their digest.
pub const MAX_KEY_BYTES: usize = 256;
const DIGEST_PREFIX: &str = "sha256:";

/// `value` itself when short, else `sha256:<hex>` of it (fixed size, still a string, so it can
/// name a Redis key too).
pub fn bounded_value(value: &str) -> Cow<'_, str> {
    if value.len() <= MAX_KEY_BYTES {
        return Cow::Borrowed(value);
    }
    Cow::Owned(digest_text(value.as_bytes()))
}

/// As `bounded_value`, for raw header bytes.
pub fn bounded_bytes(value: &[u8]) -> Cow<'_, [u8]> {
    if value.len() <= MAX_KEY_BYTES {
        return Cow::Borrowed(value);
    }
    Cow::Owned(digest_text(value).into_bytes())
}

fn digest_text(value: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, value);
    let mut text = String::with_capacity(DIGEST_PREFIX.len() + 64);
    text.push_str(DIGEST_PREFIX);
    for byte in digest.as_ref() {
        text.push(char::from_digit(u32::from(byte >> 4), 16).unwrap_or('0'));
        text.push(char::from_digit(u32::from(byte & 0xf), 16).unwrap_or('0'));
    }
    text
}

/// At most `capacity` entries; inserting a new key into a full map evicts the least recently
/// used one. Storage grows with use, not with the capacity.
pub struct BoundedMap<K: Hash + Eq, V> {
    entries: LruCache<K, V>,
    capacity: usize,
    evictions: u64,
}

impl<K: Hash + Eq, V> BoundedMap<K, V> {
    pub fn new(capacity: usize) -> Self {
        BoundedMap { entries: LruCache::unbounded(), capacity: capacity.max(1), evictions: 0 }
    }

    /// The entry, marked as just used.
    pub fn get_mut<Q>(&mut self, key: &Q) -> Option<&mut V>
    where
        K: std::borrow::Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.entries.get_mut(key)
    }

    /// Inserts or replaces `key`, evicting the least recently used entry when a new key would
    /// go over the capacity.
    pub fn insert(&mut self, key: K, value: V) {
        if self.entries.len() >= self.capacity && !self.entries.contains(&key) {
            self.entries.pop_lru();
            self.evictions += 1;
        }
        self.entries.put(key, value);
    }

    pub fn remove<Q>(&mut self, key: &Q) -> Option<V>
    where
        K: std::borrow::Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.entries.pop(key)
    }

    /// Drops every entry `keep` refuses (expired ones), without touching their recency.
    pub fn retain(&mut self, mut keep: impl FnMut(&V) -> bool)
    where
        K: Clone,
    {
        let dropped: Vec<K> = self.entries.iter().filter(|(_, v)| !keep(v)).map(|(k, _)| k.clone()).collect();
        for key in dropped {
            self.entries.pop(&key);
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Entries evicted to stay within the capacity, since the map was made.
    pub fn evictions(&self) -> u64 {
        self.evictions
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_values_stand_as_their_digest() {
        assert_eq!(bounded_value("abc"), "abc");
        let long = "x".repeat(MAX_KEY_BYTES + 1);
        let key = bounded_value(&long);
        assert!(key.starts_with("sha256:") && key.len() == 7 + 64, "{key}");
        assert_eq!(key, bounded_value(&long), "the same value gives the same key");
        assert_ne!(key, bounded_value(&"y".repeat(MAX_KEY_BYTES + 1)));
        assert_eq!(&*bounded_bytes(&[b'x'; MAX_KEY_BYTES + 1]), key.as_bytes());
        assert_eq!(bounded_value(&"x".repeat(MAX_KEY_BYTES)).len(), MAX_KEY_BYTES);
    }

    #[test]
    fn the_least_recently_used_entry_goes_first_and_is_counted() {
        let mut map = BoundedMap::new(2);
        map.insert("a", 1);
        map.insert("b", 2);
        assert_eq!(map.get_mut("a"), Some(&mut 1));
        map.insert("c", 3);
        assert_eq!(map.len(), 2);
        assert_eq!(map.evictions(), 1);
        assert!(map.get_mut("b").is_none(), "b was the least recently used");
        map.insert("a", 10);
        assert_eq!(map.evictions(), 1, "replacing a key evicts nothing");
        map.retain(|v| *v != 10);
        assert_eq!(map.len(), 1);
        assert!(map.get_mut("c").is_some());
    }
}
