//! What the tests of a running migration wait for in its progress. Included with
//! `#[path = "common/progress.rs"] mod progress;`.

use std::time::Duration;

use vmig_migration::{Progress, Status};
use vmig_test_support::wait_until;

/// Waits (at most 30 s) until the migration is in pre-copy and has sent pages.
pub fn wait_for_precopy(progress: &Progress) {
    wait_until("pre-copy to send pages", Duration::from_secs(30), || {
        let report = progress.report();
        if report.status == Status::Active && report.ram.transferred > 0 {
            Ok(())
        } else {
            Err(format!("{report:?}"))
        }
    });
}
