//! `loraplane-operator`: runs the `LoraAdapter` controller, plus `/metrics` and `/health`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use kube::runtime::events::Reporter;
use loraplane_operator::telemetry::{self, LogFormat};
use loraplane_operator::{http, run, Context, HttpServers, Metrics, RunConfig};

/// Keeps LoraAdapter resources loaded on loraplane server pods.
#[derive(Parser, Debug)]
#[command(name = "loraplane-operator", version)]
struct Args {
    /// Address of /metrics and /health.
    #[arg(long, env = "LORAPLANE_OPERATOR_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    metrics_addr: SocketAddr,
    /// Watch LoraAdapters and pods in this namespace only [default: all namespaces].
    #[arg(long, env = "LORAPLANE_OPERATOR_NAMESPACE")]
    namespace: Option<String>,
    /// Watch only pods with these labels (e.g. `app.kubernetes.io/name=loraplane-server`)
    /// [default: every pod in scope].
    #[arg(long, env = "LORAPLANE_OPERATOR_POD_SELECTOR")]
    pod_selector: Option<String>,
    /// Server port for pods without a container port named `http`.
    #[arg(long, env = "LORAPLANE_SERVER_PORT", default_value_t = 30000)]
    server_port: u16,
    /// Bearer key for servers started with `--api-key`.
    #[arg(long, env = "LORAPLANE_SERVER_API_KEY", hide_env_values = true)]
    server_api_key: Option<String>,
    /// Seconds one server call may take (loading a large adapter reads it from disk).
    #[arg(long, env = "LORAPLANE_SERVER_TIMEOUT", default_value_t = 120)]
    server_timeout: u64,
    /// Log format.
    #[arg(
        long,
        env = "LORAPLANE_OPERATOR_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    log_format: LogFormat,
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    telemetry::init(args.log_format);
    if let Err(e) = start(args).await {
        tracing::error!(error = %e, "loraplane-operator cannot start");
        std::process::exit(1);
    }
}

async fn start(args: Args) -> anyhow::Result<()> {
    let registry = prometheus::Registry::new();
    let metrics = Metrics::new(&registry)?;
    let servers = HttpServers::new(
        Duration::from_secs(args.server_timeout.max(1)),
        args.server_api_key,
    )?;
    let client = kube::Client::try_default().await?;
    let reporter = Reporter {
        controller: "loraplane-operator".into(),
        instance: std::env::var("POD_NAME").ok(),
    };
    let ctx = Arc::new(Context::new(
        client,
        reporter,
        Arc::new(servers),
        metrics,
        args.server_port,
    ));
    let web = tokio::spawn(http::serve(args.metrics_addr, registry));
    // NB: an empty value (a chart rendering `""`) means "not set".
    let config = RunConfig {
        namespace: args.namespace.filter(|s| !s.trim().is_empty()),
        pod_selector: args.pod_selector.filter(|s| !s.trim().is_empty()),
    };
    tracing::info!(
        namespace = config.namespace.as_deref().unwrap_or("<all>"),
        pod_selector = config.pod_selector.as_deref().unwrap_or("<any>"),
        server_port = args.server_port,
        "starting the LoraAdapter controller"
    );
    tokio::select! {
        () = run(ctx, config) => tracing::info!("controller stopped"),
        r = web => match r {
            Ok(Err(e)) => return Err(e.into()),
            Ok(Ok(())) => {}
            Err(e) => return Err(e.into()),
        },
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_flags() {
        let a = Args::try_parse_from(["loraplane-operator"]).unwrap();
        assert_eq!(a.metrics_addr.to_string(), "0.0.0.0:8080");
        assert_eq!(
            (a.server_port, a.namespace, a.log_format),
            (30000, None, LogFormat::Text)
        );
        let a = Args::try_parse_from([
            "loraplane-operator",
            "--namespace",
            "serving",
            "--server-port",
            "8000",
            "--log-format",
            "json",
            "--metrics-addr",
            "127.0.0.1:9090",
        ])
        .unwrap();
        assert_eq!(a.namespace.as_deref(), Some("serving"));
        assert_eq!((a.server_port, a.log_format), (8000, LogFormat::Json));
        assert!(Args::try_parse_from(["loraplane-operator", "--log-format", "xml"]).is_err());
    }
}
