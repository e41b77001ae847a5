//! Locks that keep serving after a panic.
//!
//! A panic in a request or a prefetch job is a bug, caught by the guards
//! ([`super::fuse`], [`super::prefetch`]); a lock it held is then marked
//! poisoned. Every value locked in the mount is changed in single steps
//! that a panic cannot leave half done (a map insert or remove, a small
//! `Copy` state assigned whole, a channel receive, the LRU's bookkeeping),
//! so the data is as sound after the panic as before it. Refusing the lock
//! instead would turn one bug into every later request failing.

use std::sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// `m.lock()`, recovering a poisoned lock (see the module).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// `l.read()`, recovering a poisoned lock (see the module).
pub(crate) fn read<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|p| p.into_inner())
}

/// `l.write()`, recovering a poisoned lock (see the module).
pub(crate) fn write<T>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|p| p.into_inner())
}

/// A panic's message, for the log.
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_poisoned_lock_still_serves() {
        let m = std::sync::Arc::new(Mutex::new(5));
        let m2 = m.clone();
        let r = std::thread::spawn(move || {
            let _g = m2.lock().unwrap();
            panic!("a bug");
        })
        .join();
        assert!(r.is_err() && m.is_poisoned());
        assert_eq!(*lock(&m), 5);
        let l = RwLock::new(1);
        *write(&l) = 2;
        assert_eq!(*read(&l), 2);
        let p: Box<dyn std::any::Any + Send> = Box::new("x");
        assert_eq!(panic_message(&*p), "x");
        let p: Box<dyn std::any::Any + Send> = Box::new(String::from("y"));
        assert_eq!(panic_message(&*p), "y");
        let p: Box<dyn std::any::Any + Send> = Box::new(3);
        assert_eq!(panic_message(&*p), "(no message)");
    }
}
