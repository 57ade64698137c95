//! The object store's side of image data: a blocking client of the Swift API for the objects
//! the API server keeps uploaded images in (and reads Images' `source.swift` objects from),
//! with a token sent in a header only.

use std::fs::File;
use std::io::Read;
use std::time::Duration;

use crate::{CONNECT_TIMEOUT, ImageError, ObjectSource, READ_TIMEOUT};

/// The longest an object's upload to the object store may take (the data is on local disk
/// by then, and the proxy is the cloud's own).
const SEND_TIMEOUT: Duration = Duration::from_secs(3600);

/// A client of the cloud's own object store: no redirect followed, no proxy, statuses
/// answered (not turned into errors), every step bounded in time.
pub(crate) fn agent() -> ureq::Agent {
    let config = ureq::Agent::config_builder()
        .timeout_connect(Some(CONNECT_TIMEOUT))
        .timeout_recv_response(Some(CONNECT_TIMEOUT))
        .timeout_per_read(Some(READ_TIMEOUT))
        .timeout_send_body(Some(SEND_TIMEOUT))
        .max_redirects(0)
        .http_status_as_error(false)
        .proxy(None)
        .user_agent(concat!("stratus/", env!("CARGO_PKG_VERSION")))
        .build();
    ureq::Agent::new_with_config(config)
}

fn http_error(url: &url::Url) -> impl FnOnce(ureq::Error) -> ImageError + '_ {
    move |e| ImageError::Http {
        url: url.to_string(),
        source: Box::new(e),
    }
}

fn expect(url: &url::Url, code: u16, ok: &[u16]) -> Result<(), ImageError> {
    if ok.contains(&code) {
        Ok(())
    } else {
        Err(ImageError::ObjectStatus {
            url: url.to_string(),
            code,
        })
    }
}

/// Makes `object`'s container (it may exist already).
///
/// # Errors
/// [`ImageError::ObjectStatus`] when the object store refuses; transport errors.
pub fn make_container(object: &ObjectSource<'_>) -> Result<(), ImageError> {
    let mut url = object.url()?;
    let object_segments = object.object.split('/').count();
    if let Ok(mut segments) = url.path_segments_mut() {
        for _ in 0..object_segments {
            segments.pop();
        }
    }
    let response = agent()
        .put(url.as_str())
        .header("x-auth-token", object.token)
        .send_empty()
        .map_err(http_error(&url))?;
    expect(&url, response.status().as_u16(), &[201, 202, 204])
}

/// Writes `file` (from its start) as `object`, which the object store keeps only if its MD5
/// is what it received (Swift checks the body against its length).
///
/// # Errors
/// [`ImageError::ObjectStatus`] when the object store refuses; transport errors.
pub fn put(object: &ObjectSource<'_>, file: &File) -> Result<(), ImageError> {
    let url = object.url()?;
    let response = agent()
        .put(url.as_str())
        .header("x-auth-token", object.token)
        .header("content-type", "application/octet-stream")
        .send(file)
        .map_err(http_error(&url))?;
    expect(&url, response.status().as_u16(), &[201])
}

/// The data of `object` and its length, when the object store says it.
///
/// # Errors
/// [`ImageError::ObjectStatus`] when the object store refuses (404: no such object);
/// transport errors.
pub fn get(
    object: &ObjectSource<'_>,
) -> Result<(Option<u64>, impl Read + Send + 'static), ImageError> {
    let url = object.url()?;
    let response = agent()
        .get(url.as_str())
        .header("x-auth-token", object.token)
        .call()
        .map_err(http_error(&url))?;
    expect(&url, response.status().as_u16(), &[200])?;
    let length = response
        .headers()
        .get("content-length")
        .and_then(|l| l.to_str().ok())
        .and_then(|l| l.parse::<u64>().ok());
    Ok((length, response.into_body().into_reader()))
}

/// Removes `object`; one that is not there is no error.
///
/// # Errors
/// [`ImageError::ObjectStatus`] when the object store refuses; transport errors.
pub fn delete(object: &ObjectSource<'_>) -> Result<(), ImageError> {
    let url = object.url()?;
    let response = agent()
        .delete(url.as_str())
        .header("x-auth-token", object.token)
        .call()
        .map_err(http_error(&url))?;
    expect(&url, response.status().as_u16(), &[204, 404])
}
