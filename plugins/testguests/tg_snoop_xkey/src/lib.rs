//! Test guest: the snoop guest with the credential in the x-api-key header, so a test can prove the upstream got the secret and the plugin never saw it.
use tollgate_plugin_sdk::serde_json;
use tollgate_plugin_sdk::*;
const NAME: &str = "tg_snoop_xkey";
fn auth() -> AuthScheme {
    AuthScheme::CustomHeader("x-api-key".into())
}
include!("../../snoop_common.rs");
