//! nftables' own library (`libnftables.so.1`, what the `nft` program runs), loaded when first
//! wanted and kept in the agent's process: a batch costs its parse and its one transaction,
//! without starting a process (a security group's change is a batch of a hundred rules, in
//! about a third of the time of `nft -f` of the same text).
//!
//! The library is opened with dlopen(3) at run time, so a host without it still runs the
//! agent: [`Session::open`] answers `None` and the caller runs `nft` as before. A session's
//! netlink socket is opened by `nft_ctx_new` in the network namespace of the thread that
//! makes it and stays there; every call on a session is still made from a thread inside that
//! namespace (the library may open its socket again after an error). Calls are serialized by
//! one lock for the whole process: the library's parser keeps global state.
//!
//! This is the crate's one foreign interface; each `unsafe` block says why it is sound.
#![allow(unsafe_code)]

use std::ffi::{CStr, CString, c_char, c_int, c_uint, c_void};
use std::ptr::NonNull;
use std::sync::{Mutex, OnceLock};

// glibc (2.34 on) has these in libc itself, which every Rust program links.
unsafe extern "C" {
    fn dlopen(filename: *const c_char, flag: c_int) -> *mut c_void;
    fn dlsym(handle: *mut c_void, symbol: *const c_char) -> *mut c_void;
}

const RTLD_NOW: c_int = 2;
/// `NFT_CTX_DEFAULT`: a context with its netlink socket.
const NFT_CTX_DEFAULT: c_uint = 0;

type CtxNew = unsafe extern "C" fn(c_uint) -> *mut c_void;
type CtxFree = unsafe extern "C" fn(*mut c_void);
type CtxSet = unsafe extern "C" fn(*mut c_void) -> c_int;
type CtxGet = unsafe extern "C" fn(*mut c_void) -> *const c_char;
type RunCmd = unsafe extern "C" fn(*mut c_void, *const c_char) -> c_int;

/// The library's entry points this module calls.
struct Lib {
    ctx_new: CtxNew,
    ctx_free: CtxFree,
    buffer_output: CtxSet,
    buffer_error: CtxSet,
    output_buffer: CtxGet,
    error_buffer: CtxGet,
    run_cmd: RunCmd,
}

/// The library, loaded once; `None` when the host has none (or not these entry points).
fn lib() -> Option<&'static Lib> {
    static LIB: OnceLock<Option<Lib>> = OnceLock::new();
    LIB.get_or_init(|| {
        let loaded = load();
        if loaded.is_none() {
            tracing::info!("libnftables.so.1 not loaded; nft batches run as `nft -f`");
        }
        loaded
    })
    .as_ref()
}

fn load() -> Option<Lib> {
    // SAFETY: dlopen is given a NUL-terminated name; the handle is never closed, so every
    // symbol taken from it stays valid for the life of the process.
    let handle = unsafe { dlopen(c"libnftables.so.1".as_ptr(), RTLD_NOW) };
    if handle.is_null() {
        return None;
    }
    let sym = |name: &CStr| {
        // SAFETY: a valid handle and a NUL-terminated name; a null answer is checked.
        let p = unsafe { dlsym(handle, name.as_ptr()) };
        (!p.is_null()).then_some(p)
    };
    // SAFETY (each transmute): the symbol is the function of that name in libnftables'
    // public API (nftables/libnftables.h), whose C signature is the type it is cast to.
    unsafe {
        Some(Lib {
            ctx_new: std::mem::transmute::<*mut c_void, CtxNew>(sym(c"nft_ctx_new")?),
            ctx_free: std::mem::transmute::<*mut c_void, CtxFree>(sym(c"nft_ctx_free")?),
            buffer_output: std::mem::transmute::<*mut c_void, CtxSet>(sym(
                c"nft_ctx_buffer_output",
            )?),
            buffer_error: std::mem::transmute::<*mut c_void, CtxSet>(sym(c"nft_ctx_buffer_error")?),
            output_buffer: std::mem::transmute::<*mut c_void, CtxGet>(sym(
                c"nft_ctx_get_output_buffer",
            )?),
            error_buffer: std::mem::transmute::<*mut c_void, CtxGet>(sym(
                c"nft_ctx_get_error_buffer",
            )?),
            run_cmd: std::mem::transmute::<*mut c_void, RunCmd>(sym(c"nft_run_cmd_from_buffer")?),
        })
    }
}

/// Serializes every call into the library.
static CALLS: Mutex<()> = Mutex::new(());

/// One library context (`struct nft_ctx`) with its netlink socket, in the namespace of the
/// thread that opened it; its output and errors are kept in buffers, never printed.
#[derive(Debug)]
pub struct Session {
    ctx: NonNull<c_void>,
}

// SAFETY: a context is used by one thread at a time (`&mut self`, under `CALLS`), and
// nothing in it is tied to the thread that made it (its socket is tied to a namespace, and
// callers use it from threads in that namespace).
unsafe impl Send for Session {}

/// A batch the library refused: nft's error text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused(pub String);

impl Session {
    /// A context in the calling thread's network namespace; `None` when the library is not
    /// there or cannot make one.
    pub fn open() -> Option<Self> {
        let lib = lib()?;
        let _g = CALLS.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: nft_ctx_new takes flags and returns an owned context or null.
        let ctx = NonNull::new(unsafe { (lib.ctx_new)(NFT_CTX_DEFAULT) })?;
        // SAFETY: a live context; buffering only redirects where it prints.
        let buffered = unsafe {
            (lib.buffer_output)(ctx.as_ptr()) == 0 && (lib.buffer_error)(ctx.as_ptr()) == 0
        };
        let session = Self { ctx };
        buffered.then_some(session)
    }

    /// Runs `commands` (nft's syntax; one transaction for all of them, as `nft -f`) and
    /// returns what nft printed.
    ///
    /// # Errors
    /// nft's error text when it refused the batch (nothing of it was committed), or when the
    /// text holds a NUL byte.
    pub fn run(&mut self, commands: &[u8]) -> Result<Vec<u8>, Refused> {
        let Some(lib) = lib() else {
            return Err(Refused("libnftables is not loaded".into()));
        };
        let text = CString::new(commands).map_err(|_| Refused("a NUL byte in the batch".into()))?;
        let _g = CALLS.lock().unwrap_or_else(|e| e.into_inner());
        let ctx = self.ctx.as_ptr();
        // SAFETY: a live context and a NUL-terminated buffer that outlives the call.
        let rc = unsafe { (lib.run_cmd)(ctx, text.as_ptr()) };
        // SAFETY: the buffers belong to the context and stay valid until its next call,
        // which cannot come before they are copied (`&mut self` and `CALLS`); null is
        // checked.
        let read = |get: CtxGet| unsafe {
            let p = get(ctx);
            if p.is_null() {
                Vec::new()
            } else {
                CStr::from_ptr(p).to_bytes().to_vec()
            }
        };
        let output = read(lib.output_buffer);
        let errors = read(lib.error_buffer);
        if rc == 0 {
            Ok(output)
        } else {
            Err(Refused(String::from_utf8_lossy(&errors).trim().to_owned()))
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if let Some(lib) = lib() {
            let _g = CALLS.lock().unwrap_or_else(|e| e.into_inner());
            // SAFETY: the context is owned by this session and freed once, here.
            unsafe { (lib.ctx_free)(self.ctx.as_ptr()) };
        }
    }
}

/// Whether the library is there (loading it the first time).
pub fn available() -> bool {
    lib().is_some()
}
