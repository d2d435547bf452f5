//! The HTTP server: listener page, WHEP, HLS files, `/health` and `/metrics`.
//!
//! Routing and validation happen here; media decisions do not. Every error answer carries a
//! plain-text reason, and no request can affect another listener.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;
use tern_origin_link::ingest::IngestManager;
use tern_origin_link::BroadcastId;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{debug, info};

use crate::node::Relay;
use crate::router::Router;
use crate::Error;

/// The listener page, built into the binary so the demo needs no files beside it.
const INDEX_HTML: &str = include_str!("../../web/index.html");

/// The listener's player (route, WHEP, HLS fallback, re-route), built in like the page.
const PLAYER_JS: &str = include_str!("../../web/player.js");

/// Where hls.js sits inside `http.web_dir` (installed from npm by `scripts/setup`).
const HLS_JS: &str = "node_modules/hls.js/dist/hls.min.js";

type Body = Full<Bytes>;

/// What the server serves.
pub struct HttpState {
    /// The WebRTC relay, if this process runs one.
    pub relay: Option<Relay>,
    /// Folder holding one sub-folder of HLS output per broadcast, if this process packages.
    pub hls_root: Option<PathBuf>,
    /// Assets folder (hls.js).
    pub web_dir: PathBuf,
    /// WHEP body limit.
    pub max_body_bytes: usize,
    /// Renders `/metrics`.
    pub metrics: PrometheusHandle,
    /// Process start, for `/health`.
    pub started: Instant,
    /// Broadcasts this process packages (for `/health`).
    pub packaging: Vec<String>,
    /// Who may listen; replaced on SIGHUP when token keys change.
    pub auth: std::sync::RwLock<Arc<crate::auth::Auth>>,
    /// New-session rate limit per client.
    pub limiter: std::sync::Mutex<crate::limits::RateLimiter>,
    /// True when `/metrics` and `/admin/*` have their own listener.
    pub admin_separate: bool,
    /// RTP ingest endpoints, if this process is an origin, and the address new ones bind to.
    pub ingest: Option<(Arc<IngestManager>, std::net::IpAddr)>,
    /// The geo-router, if this process routes (`tern router`, or a relay with a fleet).
    /// Replaced on SIGHUP when `[router]` changes.
    pub router: std::sync::RwLock<Option<Arc<Router>>>,
}

impl HttpState {
    /// The router in force now, if this process routes.
    pub fn router(&self) -> Option<Arc<Router>> {
        // Poisoning needs a panic while holding the lock, which only swaps an Arc.
        self.router
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// Which listener a request came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Surface {
    /// The public listener: page, WHEP, HLS, health (and metrics/admin unless separated).
    Public,
    /// The admin listener: health, metrics, admin.
    Admin,
}

/// Serves HTTP on an already-bound listener until `shutdown` flips to true, then lets open
/// requests finish (for at most 5 s).
pub async fn serve(
    listener: TcpListener,
    state: Arc<HttpState>,
    surface: Surface,
    mut shutdown: watch::Receiver<bool>,
) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(x) => x,
                    Err(e) => { debug!("accept: {e}"); continue; }
                };
                let state = state.clone();
                let svc = hyper::service::service_fn(move |req| {
                    let state = state.clone();
                    async move { Ok::<_, Infallible>(route(req, &state, peer, surface).await) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc);
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        debug!(%peer, "HTTP connection: {e}");
                    }
                });
            }
            () = crate::stopped(&mut shutdown) => break,
        }
    }
    drop(listener);
    if tokio::time::timeout(Duration::from_secs(5), graceful.shutdown())
        .await
        .is_err()
    {
        info!("HTTP connections still open after 5 s; closing them");
    }
}

async fn route(
    req: Request<Incoming>,
    st: &HttpState,
    peer: SocketAddr,
    surface: Surface,
) -> Response<Body> {
    let path = req.uri().path().to_owned();
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let method = req.method().clone();
    // Admin operations: on the admin listener, or from loopback when there is none.
    let admin_ok = match surface {
        Surface::Admin => true,
        Surface::Public => !st.admin_separate && peer.ip().is_loopback(),
    };
    let metrics_ok = surface == Surface::Admin || !st.admin_separate;
    if surface == Surface::Admin
        && !matches!(
            parts.as_slice(),
            ["health" | "metrics" | "admin", ..] | ["v1", "ingest", ..]
        )
    {
        return text(
            StatusCode::NOT_FOUND,
            format!("nothing at {path} on the admin listener"),
        );
    }
    let resp = match (method.clone(), parts.as_slice()) {
        (Method::GET, [""]) => with_type(
            Response::new(Body::from(INDEX_HTML)),
            "text/html; charset=utf-8",
        ),
        (Method::GET, ["player.js"]) => {
            let mut r = with_type(Response::new(Body::from(PLAYER_JS)), "text/javascript");
            r.headers_mut()
                .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            r
        }
        (Method::GET, ["v1", "route", b]) => route_json(&req, st, b, peer),
        (Method::POST, ["whep", b]) if st.relay.is_none() && st.router().is_some() => {
            whep_redirect(&req, st, b, peer)
        }
        (Method::GET, ["vendor", "hls.min.js"]) => {
            serve_file(&st.web_dir.join(HLS_JS), "text/javascript", "max-age=3600").await
        }
        (Method::GET, ["health"]) => health(st).await,
        (Method::GET, ["metrics"]) if metrics_ok => with_type(
            Response::new(Body::from(st.metrics.render())),
            "text/plain; version=0.0.4",
        ),
        (Method::POST, ["admin", "drain"]) if admin_ok => match &st.relay {
            Some(relay) => {
                relay.start_drain();
                text(StatusCode::ACCEPTED, "draining: new listeners are refused; the process exits when the last leaves or the drain timeout passes")
            }
            None => text(
                StatusCode::NOT_FOUND,
                "this node serves no listeners to drain",
            ),
        },
        (_, ["admin", ..]) => text(StatusCode::NOT_FOUND, format!("nothing at {path}")),
        (Method::GET, ["v1", "ingest"]) if admin_ok => ingest_list(st),
        (Method::POST, ["v1", "ingest"]) if admin_ok => ingest_create(req, st).await,
        (Method::DELETE, ["v1", "ingest", b]) if admin_ok => ingest_delete(st, b),
        (_, ["v1", "ingest", ..]) => text(StatusCode::NOT_FOUND, format!("nothing at {path}")),
        (_, ["metrics"]) if !metrics_ok => text(
            StatusCode::NOT_FOUND,
            "metrics are served on the admin listener",
        ),
        (Method::POST, ["whep", b]) => whep_post(req, st, b, peer).await,
        (Method::DELETE, ["whep", b, session]) => whep_delete(st, b, session).await,
        (Method::PATCH, ["whep", b, session]) => whep_patch(&req, st, b, session).await,
        (Method::OPTIONS, ["whep", ..]) => {
            let mut r = empty(StatusCode::NO_CONTENT);
            let h = r.headers_mut();
            h.insert(
                header::ACCESS_CONTROL_ALLOW_METHODS,
                HeaderValue::from_static("POST, DELETE, PATCH, OPTIONS"),
            );
            h.insert(
                header::ACCESS_CONTROL_ALLOW_HEADERS,
                HeaderValue::from_static("content-type, authorization"),
            );
            h.insert(
                header::ACCESS_CONTROL_EXPOSE_HEADERS,
                HeaderValue::from_static("location"),
            );
            r
        }
        (Method::GET, ["hls", b, rest @ ..]) => hls(st, b, rest).await,
        (
            _,
            [""]
            | ["health"]
            | ["metrics"]
            | ["hls", ..]
            | ["vendor", ..]
            | ["whep", ..]
            | ["v1", "route", _]
            | ["player.js"],
        ) => {
            let mut r = text(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("{method} is not allowed on {path}"),
            );
            let allow = if parts.first() == Some(&"whep") {
                "POST, DELETE, PATCH, OPTIONS"
            } else {
                "GET"
            };
            r.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static(allow));
            r
        }
        _ => text(StatusCode::NOT_FOUND, format!("nothing at {path}")),
    };
    let mut resp = resp;
    // Any page may listen: WHEP and HLS are meant to be embedded elsewhere.
    resp.headers_mut().insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    debug!(%peer, %method, %path, status = resp.status().as_u16(), "http");
    resp
}

/// The router's answer for the client of this request, or the response that says why
/// there is none (no router here, or no such broadcast).
// The error is the HTTP answer itself, built once per request: no need to box it.
#[allow(clippy::result_large_err)]
fn decide_for(
    req: &Request<Incoming>,
    st: &HttpState,
    b: &str,
    peer: SocketAddr,
    passive: bool,
) -> Result<tern_geoip::Decision, Response<Body>> {
    let Some(router) = st.router() else {
        return Err(text(
            StatusCode::NOT_FOUND,
            "this node does not route listeners",
        ));
    };
    let broadcast: BroadcastId = b
        .parse()
        .map_err(|e: tern_origin_link::Error| text(StatusCode::NOT_FOUND, e.to_string()))?;
    let xff = req
        .headers()
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok());
    let client = router.client_ip(peer.ip(), xff);
    Ok(router.route(&broadcast, client, passive))
}

/// `GET /v1/route/{broadcast}[?passive=1]`: JSON {tier, url, relay_id, region, reason}.
fn route_json(
    req: &Request<Incoming>,
    st: &HttpState,
    b: &str,
    peer: SocketAddr,
) -> Response<Body> {
    let passive = req.uri().query().is_some_and(|q| {
        q.split('&')
            .any(|kv| matches!(kv, "passive" | "passive=1" | "passive=true"))
    });
    let d = match decide_for(req, st, b, peer, passive) {
        Ok(d) => d,
        Err(r) => return r,
    };
    let mut r = with_type(
        Response::new(Body::from(serde_json::to_vec(&d).unwrap_or_default())),
        "application/json",
    );
    // A decision depends on the client and on the fleet's load right now.
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// `POST /whep/{broadcast}` on a router with no relay of its own: 307 to the chosen relay's
/// WHEP endpoint. 307 (not 302/303) because the client must repeat the POST with the same
/// offer (RFC 7231 6.4.7). With no relay to offer, 503 and a `Link` to the HLS URL.
fn whep_redirect(
    req: &Request<Incoming>,
    st: &HttpState,
    b: &str,
    peer: SocketAddr,
) -> Response<Body> {
    let d = match decide_for(req, st, b, peer, false) {
        Ok(d) => d,
        Err(r) => return r,
    };
    match (d.tier, HeaderValue::from_str(&d.url)) {
        (tern_geoip::Tier::Webrtc, Ok(loc)) => {
            let mut r = text(
                StatusCode::TEMPORARY_REDIRECT,
                format!("listen at {} ({})", d.url, d.relay_id.unwrap_or_default()),
            );
            r.headers_mut().insert(header::LOCATION, loc);
            r.headers_mut()
                .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            r
        }
        _ => {
            let mut r = text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("no relay has room; listen over HLS at {}", d.url),
            );
            if let Ok(link) = HeaderValue::from_str(&format!(
                "<{}>; rel=\"alternate\"; type=\"application/vnd.apple.mpegurl\"",
                d.url
            )) {
                r.headers_mut().insert(header::LINK, link);
            }
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
            r
        }
    }
}

async fn whep_post(
    req: Request<Incoming>,
    st: &HttpState,
    b: &str,
    peer: SocketAddr,
) -> Response<Body> {
    let Some(relay) = &st.relay else {
        return text(
            StatusCode::NOT_FOUND,
            "this node does not serve WebRTC listeners",
        );
    };
    let broadcast: BroadcastId = match b.parse() {
        Ok(b) => b,
        Err(e) => return text(StatusCode::NOT_FOUND, e.to_string()),
    };
    // Rate limit first: it is the cheapest check and also bounds token guessing.
    {
        // A panic while holding this lock would be a bug in RateLimiter; its state stays
        // usable, so recover the guard rather than fail every later request.
        let mut limiter = st.limiter.lock().unwrap_or_else(|e| e.into_inner());
        if !limiter.allow(peer.ip(), Instant::now()) {
            metrics::counter!("tern_relay_sessions_rate_limited_total").increment(1);
            let mut r = text(
                StatusCode::TOO_MANY_REQUESTS,
                "too many new sessions from this address",
            );
            let wait = limiter.retry_after(peer.ip()).max(1).to_string();
            if let Ok(v) = HeaderValue::from_str(&wait) {
                r.headers_mut().insert(header::RETRY_AFTER, v);
            }
            return r;
        }
    }
    let authorization = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    // Cloned out of the lock so a reload never waits on a request, nor a request on a reload.
    let auth = st.auth.read().unwrap_or_else(|e| e.into_inner()).clone();
    if let Err(denied) = auth.check(authorization, &broadcast) {
        metrics::counter!("tern_relay_sessions_unauthorized_total").increment(1);
        let mut r = text(StatusCode::UNAUTHORIZED, denied.to_string());
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return r;
    }
    let ctype = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !ctype.to_ascii_lowercase().starts_with("application/sdp") {
        return text(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("Content-Type must be application/sdp, not {ctype:?}"),
        );
    }
    let body = match Limited::new(req.into_body(), st.max_body_bytes)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return text(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("offer larger than {} bytes", st.max_body_bytes),
            )
        }
        Err(e) => return text(StatusCode::BAD_REQUEST, format!("reading body: {e}")),
    };
    let Ok(offer) = String::from_utf8(body.to_vec()) else {
        return text(StatusCode::BAD_REQUEST, "the offer is not UTF-8 text");
    };
    match relay.add_listener(broadcast.clone(), offer).await {
        Ok((session, answer)) => {
            let mut r = Response::new(Body::from(answer));
            *r.status_mut() = StatusCode::CREATED;
            let h = r.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/sdp"),
            );
            // Both parts are [A-Za-z0-9_-] / hex, always valid header text.
            if let Ok(loc) = HeaderValue::from_str(&format!("/whep/{broadcast}/{session}")) {
                h.insert(header::LOCATION, loc);
            }
            h.insert(
                header::ACCESS_CONTROL_EXPOSE_HEADERS,
                HeaderValue::from_static("location"),
            );
            r
        }
        Err(e) => error_response(&e),
    }
}

async fn whep_delete(st: &HttpState, b: &str, session: &str) -> Response<Body> {
    let (Some(relay), Ok(broadcast)) = (&st.relay, b.parse::<BroadcastId>()) else {
        return text(StatusCode::NOT_FOUND, "no such session");
    };
    if relay.remove_listener(broadcast, session.to_owned()).await {
        empty(StatusCode::OK)
    } else {
        text(StatusCode::NOT_FOUND, "no such session")
    }
}

/// Trickle ICE (RFC 9725 §4.3): an ICE-lite server learns every client address from the
/// client's own connectivity checks, so candidates sent later need no action; they are
/// accepted (204) for a live session so WHEP clients that trickle keep working.
async fn whep_patch(
    req: &Request<Incoming>,
    st: &HttpState,
    b: &str,
    session: &str,
) -> Response<Body> {
    let ctype = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !ctype.eq_ignore_ascii_case("application/trickle-ice-sdpfrag") {
        return text(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "PATCH takes application/trickle-ice-sdpfrag",
        );
    }
    let (Some(relay), Ok(broadcast)) = (&st.relay, b.parse::<BroadcastId>()) else {
        return text(StatusCode::NOT_FOUND, "no such session");
    };
    if relay.has_session(broadcast, session.to_owned()).await {
        empty(StatusCode::NO_CONTENT)
    } else {
        text(StatusCode::NOT_FOUND, "no such session")
    }
}

fn ingest_json(e: &tern_origin_link::ingest::Endpoint) -> serde_json::Value {
    json!({
        "broadcast": e.broadcast.as_str(),
        "address": e.addr.to_string(),
        "port": e.addr.port(),
        "codec": "opus/48000",
    })
}

fn json_response(status: StatusCode, v: &serde_json::Value) -> Response<Body> {
    let mut r = with_type(Response::new(Body::from(v.to_string())), "application/json");
    *r.status_mut() = status;
    r
}

fn ingest_list(st: &HttpState) -> Response<Body> {
    let Some((ingest, _)) = &st.ingest else {
        return text(StatusCode::NOT_FOUND, "this node is not an origin");
    };
    let all: Vec<_> = ingest.list().iter().map(ingest_json).collect();
    json_response(StatusCode::OK, &json!(all))
}

/// `POST /v1/ingest` with `{"broadcast": "id", "port": 5004}` (port optional): opens an RTP
/// endpoint and answers where to send, as an SFU's plain transport API does.
async fn ingest_create(req: Request<Incoming>, st: &HttpState) -> Response<Body> {
    let Some((ingest, bind_ip)) = &st.ingest else {
        return text(StatusCode::NOT_FOUND, "this node is not an origin");
    };
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Create {
        broadcast: String,
        #[serde(default)]
        port: u16,
    }
    let body = match Limited::new(req.into_body(), 4096).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return text(StatusCode::PAYLOAD_TOO_LARGE, "request body over 4 KiB"),
    };
    let create: Create = match serde_json::from_slice(&body) {
        Ok(c) => c,
        Err(e) => {
            return text(
                StatusCode::BAD_REQUEST,
                format!("expected {{\"broadcast\": ..., \"port\": ...}}: {e}"),
            )
        }
    };
    let broadcast: BroadcastId = match create.broadcast.parse() {
        Ok(b) => b,
        Err(e) => return text(StatusCode::BAD_REQUEST, e.to_string()),
    };
    match ingest
        .create(broadcast, SocketAddr::new(*bind_ip, create.port))
        .await
    {
        Ok(ep) => json_response(StatusCode::CREATED, &ingest_json(&ep)),
        Err(tern_origin_link::Error::Refused(why)) => text(StatusCode::CONFLICT, why),
        Err(e) => text(StatusCode::BAD_REQUEST, e.to_string()),
    }
}

fn ingest_delete(st: &HttpState, b: &str) -> Response<Body> {
    let (Some((ingest, _)), Ok(broadcast)) = (&st.ingest, b.parse::<BroadcastId>()) else {
        return text(StatusCode::NOT_FOUND, "no such ingest endpoint");
    };
    if ingest.delete(&broadcast) {
        empty(StatusCode::NO_CONTENT)
    } else {
        text(StatusCode::NOT_FOUND, "no such ingest endpoint")
    }
}

fn error_response(e: &Error) -> Response<Body> {
    let status = match e {
        Error::BadOffer(_) => StatusCode::BAD_REQUEST,
        Error::UnknownBroadcast(_) => StatusCode::NOT_FOUND,
        Error::Full | Error::ShuttingDown | Error::Draining => StatusCode::SERVICE_UNAVAILABLE,
        Error::Upstream(_) => StatusCode::BAD_GATEWAY,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    let mut r = text(status, e.to_string());
    if status == StatusCode::SERVICE_UNAVAILABLE {
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
    }
    r
}

async fn health(st: &HttpState) -> Response<Body> {
    let (listeners, upstream, draining) = match &st.relay {
        Some(relay) => {
            let snap = relay.snapshot();
            (
                json!({
                    "total": snap.total,
                    "per_broadcast": snap.per_broadcast,
                    "capacity": snap.capacity,
                    "link_subscribers": relay.downstream_count().await,
                }),
                json!(relay.upstream_states().await),
                relay.is_draining(),
            )
        }
        None => (json!(null), json!(null), false),
    };
    let router = st.router().map(|r| r.fleet_json());
    let body = json!({
        "status": if draining { "draining" } else { "ok" },
        "draining": draining,
        "router": router,
        "uptime_seconds": st.started.elapsed().as_secs(),
        "listeners": listeners,
        "upstream": upstream,
        "packaging": st.packaging,
        "version": env!("CARGO_PKG_VERSION"),
    });
    with_type(
        Response::new(Body::from(body.to_string())),
        "application/json",
    )
}

async fn hls(st: &HttpState, b: &str, rest: &[&str]) -> Response<Body> {
    let Some(root) = &st.hls_root else {
        return text(StatusCode::NOT_FOUND, "this node does not package HLS");
    };
    let Ok(broadcast) = b.parse::<BroadcastId>() else {
        return text(StatusCode::NOT_FOUND, "no such broadcast");
    };
    // Only plain names: no empty parts, no dot files, no "..", so no way out of the root.
    let safe = !rest.is_empty()
        && rest.len() <= 2
        && rest.iter().all(|p| {
            !p.is_empty()
                && !p.starts_with('.')
                && p.bytes()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
        });
    if !safe {
        return text(StatusCode::NOT_FOUND, "no such file");
    }
    let mut path = root.join(broadcast.as_str());
    for p in rest {
        path.push(p);
    }
    // The last part was checked non-empty above.
    let name = rest[rest.len() - 1];
    let (ctype, cache) = if name.ends_with(".m3u8") {
        // Live playlists change every segment: cache for under half a target duration.
        ("application/vnd.apple.mpegurl", "max-age=1")
    } else if name.ends_with(".m4s") {
        ("audio/mp4", "max-age=31536000, immutable")
    } else if name.ends_with(".mp4") {
        ("audio/mp4", "max-age=60")
    } else {
        return text(StatusCode::NOT_FOUND, "no such file");
    };
    serve_file(&path, ctype, cache).await
}

async fn serve_file(path: &Path, ctype: &'static str, cache: &'static str) -> Response<Body> {
    match tokio::fs::read(path).await {
        Ok(bytes) => {
            let mut r = with_type(Response::new(Body::from(bytes)), ctype);
            r.headers_mut()
                .insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
            r
        }
        Err(_) => text(StatusCode::NOT_FOUND, "no such file"),
    }
}

fn with_type(mut r: Response<Body>, ctype: &'static str) -> Response<Body> {
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(ctype));
    r
}

fn text(status: StatusCode, msg: impl Into<String>) -> Response<Body> {
    let mut msg = msg.into();
    msg.push('\n');
    let mut r = with_type(Response::new(Body::from(msg)), "text/plain; charset=utf-8");
    *r.status_mut() = status;
    r
}

fn empty(status: StatusCode) -> Response<Body> {
    let mut r = Response::new(Body::default());
    *r.status_mut() = status;
    r
}
