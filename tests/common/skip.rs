//! Skipping a test that needs what this machine lacks (root, a tool, the built package), in one
//! place: a visible `SKIPPED test: why` line on an ordinary machine, and a failure in CI.
//!
//! CI sets [`REQUIRE_ALL`]: there every tool is installed and the suite runs as root, so a skip
//! can only mean a missing install step in `.ci/run`, which must not pass silently.

/// When set to `1`, every skip fails the test instead.
pub const REQUIRE_ALL: &str = "FERRYD_TESTS_REQUIRE_ALL";

/// Says that the running test (or the part of it the caller names) cannot run here because of
/// `why`; under [`REQUIRE_ALL`] fails it instead. The caller returns after it.
#[track_caller]
pub fn skipped(why: &str) {
    let current = std::thread::current();
    let test = current.name().unwrap_or("a test");
    if std::env::var(REQUIRE_ALL).is_ok_and(|v| v == "1") {
        panic!(
            "{test} cannot run here: {why} ({REQUIRE_ALL}=1: every test must run; is an install step missing from .ci/run?)"
        );
    }
    eprintln!("SKIPPED {test}: {why}");
}

/// Whether `tool` is on this machine's PATH.
pub fn have(tool: &str) -> bool {
    std::process::Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Whether this machine can run a test that needs root (when `root_for` says what for) and each
/// of `tools` on PATH; when it cannot, says which is missing (see [`skipped`]) and returns false.
#[track_caller]
pub fn needs(root_for: Option<&str>, tools: &[&str]) -> bool {
    if let Some(what) = root_for
        && !root()
    {
        skipped(&format!("needs root ({what}); CI runs it as root"));
        return false;
    }
    if let Some(missing) = tools.iter().find(|tool| !have(tool)) {
        skipped(&format!("`{missing}` is not installed (CI installs it)"));
        return false;
    }
    true
}

/// Whether the tests run as root.
pub fn root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Returns from the calling test, saying why (see [`skipped`]), unless `$needs` holds.
#[macro_export]
macro_rules! skip_unless {
    ($needs:expr, $($why:tt)+) => {
        if !$needs {
            $crate::common::skip::skipped(&format!($($why)+));
            return;
        }
    };
}
