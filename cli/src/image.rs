//! `stratus image upload`: an Image's data sent to the API server (`PUT images/NAME/data`),
//! streamed from a file, the Image made first when it does not exist.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http_body_util::BodyExt;
use kube::api::{Api, PostParams};
use kube::client::ConfigExt;
use serde_json::{Value, json};
use stratus_api_types::image::{Image, ImagePhase};
use tokio::io::AsyncReadExt;

use crate::client::ClientArgs;
use crate::kubeconfig::Kubeconfig;

/// `stratus image ...`.
#[derive(Debug, clap::Subcommand)]
pub enum ImageCommand {
    /// Upload FILE as the data of Image NAME (made, with `source.upload`, when missing), then
    /// wait until it is Active.
    Upload {
        #[command(flatten)]
        client: ClientArgs,
        #[command(flatten)]
        args: UploadArgs,
    },
}

/// The formats an uploaded disk image may have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum UploadFormat {
    /// QEMU copy-on-write.
    Qcow2,
    /// Raw.
    Raw,
}

impl UploadFormat {
    fn as_str(self) -> &'static str {
        match self {
            Self::Qcow2 => "qcow2",
            Self::Raw => "raw",
        }
    }
}

/// `stratus image upload`.
#[derive(Debug, clap::Args)]
pub struct UploadArgs {
    /// The Image's name.
    pub name: String,
    /// The file holding its data.
    pub file: PathBuf,
    /// Its format (for a new Image qcow2 when not given; an existing Image's must match).
    #[arg(long, value_enum)]
    pub disk_format: Option<UploadFormat>,
    /// Seconds to wait for the Image to be Active once its data is sent.
    #[arg(long, default_value_t = 300)]
    pub timeout: u64,
}

/// Runs an image subcommand.
pub async fn run(command: ImageCommand) -> Result<()> {
    match command {
        ImageCommand::Upload { client, args } => upload(&client, args).await,
    }
}

/// The most of an answer's body read (a `Status`).
const ANSWER_BYTES: usize = 64 * 1024;
/// How much of the file is read and sent at once.
const CHUNK: usize = 256 * 1024;

async fn upload(c: &ClientArgs, a: UploadArgs) -> Result<()> {
    let config = Kubeconfig::locate(c.kubeconfig.as_deref())?
        .config()
        .await?;
    let ns = c
        .namespace
        .clone()
        .unwrap_or_else(|| config.default_namespace.clone());
    let client = kube::Client::try_from(config.clone()).context("build the API client")?;
    let images: Api<Image> = Api::namespaced(client, &ns);
    let name = &a.name;
    let file = tokio::fs::File::open(&a.file)
        .await
        .with_context(|| format!("open {}", a.file.display()))?;
    let length = file
        .metadata()
        .await
        .with_context(|| format!("read {}", a.file.display()))?
        .len();

    match images
        .get_opt(name)
        .await
        .with_context(|| format!("get image {name}"))?
    {
        Some(image) => usable(&image, name, a.disk_format)?,
        None => {
            let format = a.disk_format.unwrap_or(UploadFormat::Qcow2);
            let image: Image = serde_json::from_value(json!({
                "apiVersion": "image.stratus.dev/v1",
                "kind": "Image",
                "metadata": {"name": name},
                "spec": {"diskFormat": format.as_str(), "source": {"upload": {}}},
            }))
            .context("build the Image")?;
            images
                .create(&PostParams::default(), &image)
                .await
                .map_err(refused)
                .with_context(|| format!("create image {name}"))?;
            eprintln!("image {name} created ({})", format.as_str());
        }
    }

    send(&config, &ns, name, file, length).await?;
    eprintln!("image {name}: {length} bytes sent, waiting for it to be Active");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(a.timeout);
    loop {
        let image = images
            .get(name)
            .await
            .with_context(|| format!("get image {name}"))?;
        let status = image.status.unwrap_or_default();
        match status.phase {
            ImagePhase::Active => {
                println!(
                    "image {name} is Active: {} bytes, sha256 {}",
                    status.size_bytes.unwrap_or_default(),
                    status.sha256.unwrap_or_default()
                );
                return Ok(());
            }
            ImagePhase::Error => bail!(
                "image {name} is in Error: {}",
                status
                    .conditions
                    .iter()
                    .map(|c| format!("{}={} {}: {}", c.type_, c.status, c.reason, c.message))
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
            _ if tokio::time::Instant::now() >= deadline => {
                bail!("image {name} is not Active after {} s", a.timeout)
            }
            _ => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

/// Whether data may be uploaded to the existing Image `image`: one taking its data by upload,
/// not Active, of the format asked for (if any).
fn usable(image: &Image, name: &str, format: Option<UploadFormat>) -> Result<()> {
    if image.spec.source.upload.is_none() {
        bail!(
            "image {name} takes its data from its source (spec.source), not by upload: upload to another name"
        );
    }
    let declared = serde_json::to_value(image.spec.disk_format)?;
    let declared = declared.as_str().unwrap_or_default();
    if let Some(f) = format
        && declared != f.as_str()
    {
        bail!(
            "image {name} is declared {declared}, not {}: upload {} data, or to another name",
            f.as_str(),
            declared
        );
    }
    if image
        .status
        .as_ref()
        .is_some_and(|s| s.phase == ImagePhase::Active)
    {
        bail!("image {name} is Active and its data cannot change: upload to a new Image");
    }
    Ok(())
}

/// An API refusal as its `Status` says it.
fn refused(e: kube::Error) -> anyhow::Error {
    match e {
        kube::Error::Api(s) => anyhow::anyhow!("{} ({} {})", s.message, s.code, s.reason),
        other => anyhow::Error::new(other),
    }
}

/// Streams `file` (`length` bytes) to `images/NAME/data` of `ns`, a chunk at a time.
async fn send(
    config: &kube::Config,
    ns: &str,
    name: &str,
    file: tokio::fs::File,
    length: u64,
) -> Result<()> {
    use tower::ServiceExt;
    let chunks = futures::stream::unfold(file, |mut file| async move {
        let mut buf = vec![0u8; CHUNK];
        match file.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok(hyper::body::Frame::data(Bytes::from(buf))), file))
            }
            Err(e) => Some((Err(e), file)),
        }
    });
    let body = http_body_util::StreamBody::new(chunks).boxed_unsync();
    let connector = config
        .rustls_https_connector()
        .context("set up TLS to the API server")?;
    let http = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build::<_, http_body_util::combinators::UnsyncBoxBody<Bytes, std::io::Error>>(
        connector,
    );
    type BoxError = Box<dyn std::error::Error + Send + Sync>;
    let service = tower::ServiceBuilder::new()
        .layer(config.base_uri_layer())
        .option_layer(config.auth_layer().context("set up the credentials")?)
        .map_err(BoxError::from)
        .service(http);
    let request = http::Request::put(format!(
        "/apis/image.stratus.dev/v1/namespaces/{ns}/images/{name}/data"
    ))
    .header(http::header::CONTENT_TYPE, "application/octet-stream")
    .header(http::header::CONTENT_LENGTH, length)
    .body(body)
    .context("build the upload")?;
    let response = service
        .oneshot(request)
        .await
        .map_err(|e| anyhow::anyhow!("send the image data: {e}"))?;
    let code = response.status();
    let answer = http_body_util::Limited::new(response.into_body(), ANSWER_BYTES)
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    if code.is_success() {
        return Ok(());
    }
    let status: Value = serde_json::from_slice(&answer).unwrap_or(Value::Null);
    let message = status["message"]
        .as_str()
        .map(str::to_owned)
        .unwrap_or_else(|| String::from_utf8_lossy(&answer).into_owned());
    let fields: Vec<String> = status["details"]["causes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["field"].as_str().map(str::to_owned))
        .collect();
    let retry = status["details"]["retryAfterSeconds"]
        .as_u64()
        .map(|s| format!("; try again in {s} s"))
        .unwrap_or_default();
    let at = if fields.is_empty() {
        String::new()
    } else {
        format!(" (at {})", fields.join(", "))
    };
    bail!("the upload of image {name} was refused: {message}{at} ({code}){retry}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(spec: Value, phase: Option<&str>) -> Image {
        let mut v = json!({"apiVersion": "image.stratus.dev/v1", "kind": "Image",
                           "metadata": {"name": "disk"}, "spec": spec});
        if let Some(p) = phase {
            v["status"] = json!({"phase": p});
        }
        serde_json::from_value(v).expect("an Image")
    }

    #[test]
    fn only_an_upload_image_of_the_same_format_not_active_takes_data() {
        let upload = json!({"diskFormat": "raw", "source": {"upload": {}}});
        assert!(usable(&image(upload.clone(), None), "disk", None).is_ok());
        assert!(
            usable(
                &image(upload.clone(), Some("Error")),
                "disk",
                Some(UploadFormat::Raw)
            )
            .is_ok()
        );
        let e = usable(
            &image(upload.clone(), None),
            "disk",
            Some(UploadFormat::Qcow2),
        )
        .expect_err("another format");
        assert!(e.to_string().contains("declared raw"), "{e}");
        let e = usable(&image(upload, Some("Active")), "disk", None).expect_err("Active");
        assert!(e.to_string().contains("Active"), "{e}");
        let url = json!({"diskFormat": "raw", "source": {"url": "https://example.org/d.raw"}});
        let e = usable(&image(url, None), "disk", None).expect_err("a URL image");
        assert!(e.to_string().contains("spec.source"), "{e}");
    }
}
