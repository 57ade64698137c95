//! libvirt domain lifecycle events (defined, started, stopped, crashed, undefined …) and device
//! events (a device plugged into or unplugged from a running guest), delivered to the agent as
//! the names of the domains they concern, so that a guest changed behind Stratus's back is
//! looked at at once instead of at the next periodic pass.
//!
//! The `virt` crate runs libvirt's default event loop but does not wrap domain event
//! callbacks, so this module calls `virConnectDomainEventRegisterAny` itself. It is the only
//! place in Stratus with `unsafe` code, and keeps it to three calls whose contracts are stated
//! below.
#![allow(unsafe_code)]

use std::ffi::{CStr, c_char, c_int, c_void};
use std::sync::Once;
use std::time::Duration;

use tokio::sync::mpsc::UnboundedSender;
use virt::connect::Connect;
use virt::sys;

static EVENT_LOOP: Once = Once::new();

/// Registers libvirt's default event loop and runs it on a thread of its own, once per
/// process. A connection delivers events only if this happened before it was opened.
pub fn ensure_event_loop() {
    EVENT_LOOP.call_once(|| {
        if let Err(e) = virt::event::event_register_default_impl() {
            tracing::warn!(error = %e, "libvirt event loop unavailable; guests are polled only");
            return;
        }
        let spawned = std::thread::Builder::new()
            .name("libvirt-events".into())
            .spawn(|| {
                loop {
                    if let Err(e) = virt::event::event_run_default_impl() {
                        tracing::warn!(error = %e, "libvirt event loop iteration failed");
                        std::thread::sleep(Duration::from_secs(1));
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the libvirt event thread");
        }
    });
}

/// Lifecycle and device events of every domain of one connection, sent as domain names;
/// deregistered when dropped.
pub struct Subscription {
    conn: Connect,
    ids: Vec<c_int>,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("ids", &self.ids)
            .finish()
    }
}

type Lifecycle =
    unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, c_int, c_int, *mut c_void) -> c_int;
type Device =
    unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, *const c_char, *mut c_void);
type Generic = unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, *mut c_void);

/// Called by libvirt on its event thread for each lifecycle event.
unsafe extern "C" fn lifecycle(
    _conn: sys::virConnectPtr,
    dom: sys::virDomainPtr,
    _event: c_int,
    _detail: c_int,
    opaque: *mut c_void,
) -> c_int {
    // SAFETY: as `send_name` requires: libvirt's own arguments to this callback.
    unsafe { send_name(dom, opaque) };
    0
}

/// Called by libvirt on its event thread for each device added to or removed from a guest.
unsafe extern "C" fn device(
    _conn: sys::virConnectPtr,
    dom: sys::virDomainPtr,
    _alias: *const c_char,
    opaque: *mut c_void,
) {
    // SAFETY: as `send_name` requires: libvirt's own arguments to this callback.
    unsafe { send_name(dom, opaque) };
}

/// Sends the name of `dom` through the sender `opaque` points to.
///
/// # Safety
/// `dom` and `opaque` are what libvirt passes an event callback registered by `subscribe`.
unsafe fn send_name(dom: sys::virDomainPtr, opaque: *mut c_void) {
    // SAFETY: `opaque` is the `Box<UnboundedSender<String>>` leaked by `register`; libvirt
    // passes it to every callback until it hands it to `free_sender`, after the last one.
    let tx = unsafe { &*(opaque as *const UnboundedSender<String>) };
    // SAFETY: `dom` is valid for the duration of the callback; the name it returns lives as
    // long as the domain object and is copied before returning.
    let name = unsafe { sys::virDomainGetName(dom) };
    if !name.is_null() {
        // SAFETY: libvirt returns a NUL-terminated string.
        let name = unsafe { CStr::from_ptr(name) }
            .to_string_lossy()
            .into_owned();
        // A closed receiver means the agent stopped listening; nothing to do.
        let _ = tx.send(name);
    }
}

/// Called by libvirt once the registration is gone.
unsafe extern "C" fn free_sender(opaque: *mut c_void) {
    // SAFETY: `opaque` came from `Box::into_raw` in `subscribe` and libvirt calls this once.
    drop(unsafe { Box::from_raw(opaque as *mut UnboundedSender<String>) });
}

/// Sends the name of every domain of `conn` whose lifecycle changes, or that gains or loses
/// a device while it runs, to `tx`.
///
/// # Errors
///
/// libvirt's error when the connection cannot deliver lifecycle events. Device events a
/// driver cannot deliver are only logged: lifecycle events and the periodic pass still come.
pub fn subscribe(
    conn: &Connect,
    tx: UnboundedSender<String>,
) -> Result<Subscription, virt::error::Error> {
    // SAFETY: libvirt calls a lifecycle callback with the lifecycle signature; its API takes
    // every callback as the generic type and expects the caller to cast (its own
    // VIR_DOMAIN_EVENT_CALLBACK macro does the same). Both are `extern "C"` function pointers.
    let lifecycle = unsafe { std::mem::transmute::<Lifecycle, Generic>(lifecycle) };
    // SAFETY: likewise for the device callbacks' signature.
    let device = unsafe { std::mem::transmute::<Device, Generic>(device) };
    let mut sub = Subscription {
        conn: conn.clone(),
        ids: vec![register(
            conn,
            sys::VIR_DOMAIN_EVENT_ID_LIFECYCLE,
            lifecycle,
            tx.clone(),
        )?],
    };
    for event in [
        sys::VIR_DOMAIN_EVENT_ID_DEVICE_ADDED,
        sys::VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED,
    ] {
        match register(conn, event, device, tx.clone()) {
            Ok(id) => sub.ids.push(id),
            Err(e) => tracing::debug!(event, error = %e, "libvirt device events unavailable"),
        }
    }
    Ok(sub)
}

/// Registers `callback` for `event` on every domain of `conn`, sending through `tx`.
fn register(
    conn: &Connect,
    event: sys::virDomainEventID,
    callback: Generic,
    tx: UnboundedSender<String>,
) -> Result<c_int, virt::error::Error> {
    let opaque = Box::into_raw(Box::new(tx)).cast::<c_void>();
    // SAFETY: `conn` is an open connection for the duration of the call; a null domain means
    // every domain; `callback` has the signature libvirt calls for `event`; `opaque` stays
    // valid until libvirt calls `free_sender`.
    let id = unsafe {
        sys::virConnectDomainEventRegisterAny(
            conn.as_ptr(),
            std::ptr::null_mut(),
            event as c_int,
            Some(callback),
            opaque,
            Some(free_sender),
        )
    };
    if id < 0 {
        let e = virt::error::Error::last_error();
        // SAFETY: a failed registration does not call `free_sender`; the box is still ours.
        unsafe { free_sender(opaque) };
        return Err(e);
    }
    Ok(id)
}

impl Drop for Subscription {
    fn drop(&mut self) {
        for &id in &self.ids {
            // SAFETY: `self.conn` keeps the connection open; `id` came from a successful
            // registration on it and is deregistered only here.
            let rc = unsafe { sys::virConnectDomainEventDeregisterAny(self.conn.as_ptr(), id) };
            if rc < 0 {
                tracing::debug!(id, "libvirt event deregistration failed");
            }
        }
    }
}
