//! Stratus cluster-wide reconcilers, each driven by kube-runtime against the API server.

pub mod gc;

/// Failures that stop the controllers.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The garbage collector stopped.
    #[error("garbage collector")]
    Gc(#[from] gc::GcError),
}

/// Runs every controller until one fails.
///
/// # Errors
/// The first controller failure that retrying cannot fix.
pub async fn run(client: kube::Client) -> Result<(), Error> {
    gc::run(client).await?;
    Ok(())
}
