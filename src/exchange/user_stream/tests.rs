//! Unit tests of `user_stream`.

use super::*;

#[test]
fn the_key_is_redacted_and_the_route_is_private() {
    let k = Secret::new("abcDEF123");
    assert_eq!(
        stream_url("wss://fstream.binance.com", &k),
        "wss://fstream.binance.com/private/ws?listenKey=abcDEF123"
    );
    assert_eq!(
        redact(
            "URL error: wss://h/private/ws?listenKey=abcDEF123 refused",
            &k
        ),
        "URL error: wss://h/private/ws?listenKey=[listenKey] refused"
    );
}
