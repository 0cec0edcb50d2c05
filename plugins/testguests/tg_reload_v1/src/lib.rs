//! Test guest: version 1.0.0 of the `reload` provider, for the hot-reload tests.
const VERSION: &str = "1.0.0";
include!("../../reload_common.rs");
