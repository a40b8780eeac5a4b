//! Storage work that cannot bring the process down.
//!
//! redb trusts its own pages and panics (index out of bounds, failed asserts) on some
//! corrupt ones; a flipped byte on disk must give an error that says the file is
//! corrupt, not an aborted process. The panic hook stays silent for these (the error
//! says what happened); every other panic is reported as before.

use std::cell::Cell;
use std::sync::Once;

thread_local! {
    static IN_STORAGE: Cell<bool> = const { Cell::new(false) };
}
static QUIET_STORAGE_PANICS: Once = Once::new();

/// Run `work`; a panic inside it becomes `panicked(message)`.
pub fn contain<T, E>(
    work: impl FnOnce() -> Result<T, E>,
    panicked: impl FnOnce(String) -> E,
) -> Result<T, E> {
    QUIET_STORAGE_PANICS.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !IN_STORAGE.with(Cell::get) {
                previous(info);
            }
        }));
    });
    let outer = IN_STORAGE.with(|s| s.replace(true));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(work));
    IN_STORAGE.with(|s| s.set(outer));
    result.unwrap_or_else(|payload| {
        let message = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "no message".into());
        Err(panicked(message))
    })
}
