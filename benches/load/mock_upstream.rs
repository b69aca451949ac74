//! The load benchmark's upstream: the test suite's OpenAI/Anthropic mock,
//! without request recording. `keyrouter-mock-upstream 127.0.0.1:19000`

#[path = "../../tests/common/mock_upstream.rs"]
mod mock_upstream;

use std::sync::Arc;
use std::sync::atomic::AtomicUsize;

#[tokio::main]
async fn main() {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:19000".into());
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .unwrap_or_else(|e| panic!("cannot listen on {addr}: {e}"));
    mock_upstream::serve(listener, None, None, Arc::new(AtomicUsize::new(0))).await;
}
