//! The web application firewall: libmodsecurity 3 with the OWASP Core Rule Set (or the
//! user's own rules), in the access phase after IP lists and rate limits and before any
//! Python plugin, so an attack never reaches authentication code or the upstream.
//!
//! libmodsecurity is loaded with `dlopen` the first time a config enables the WAF: the
//! extension does not link to it, and gateways without a `waf:` section need nothing
//! installed. The C API is small; the signatures below follow `modsecurity/*.h` of 3.0.x.
//!
//! Rules are compiled when a config is built (never per request): one rules set per
//! distinct effective setting (paranoia, threshold, exclusions, mode), shared by every
//! route that has that setting. A reload builds new ones.
//!
//! Evaluation runs inline on the worker's I/O thread, as nginx's ModSecurity connector
//! runs it in nginx's event loop. Measured with `bench/waf/run.sh` (libmodsecurity 3.0.9,
//! CRS 3.3.4, PL1): about 0.5 ms of CPU for a small GET and 3 ms for a 2 KiB form, almost
//! all of it inside libmodsecurity (allocation and rule evaluation). tokio's blocking pool
//! would not make that cheaper: a worker is one core's worth of work, and the pool's threads
//! would take the same CPU plus a thread hop and a wake-up per request. What inline costs is
//! latency for the worker's other connections while an inspection runs (up to a few ms for
//! a large body); add workers to spread it. Inline also means a rules set is only ever
//! evaluated by one thread at a time: libmodsecurity shares a `RulesSet` read-only between
//! transactions, but does not document concurrent evaluation as safe.

use crate::body::InboundBody;
use crate::config::ConfigProblem;
use crate::error::{ErrorKind, GatewayError};
use crate::phase::RequestCtx;
use bytes::Bytes;
use http::request;
use http_body_util::BodyExt;
use hyper::body::Frame;
use serde::Deserialize;
use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// Where Debian (and most distributions) install the OWASP CRS.
pub const CRS_RULES_DIR: &str = "/usr/share/modsecurity-crs/rules";
/// The distribution's local exclusion files, included around the CRS when present.
const CRS_LOCAL_BEFORE: &str = "/etc/modsecurity/crs/REQUEST-900-EXCLUSION-RULES-BEFORE-CRS.conf";
const CRS_LOCAL_AFTER: &str = "/etc/modsecurity/crs/RESPONSE-999-EXCLUSION-RULES-AFTER-CRS.conf";
const LIBRARY: &str = "libmodsecurity.so.3";
/// Names another libmodsecurity to open (a build of its own, a non-standard prefix).
const LIBRARY_ENV: &str = "FERROGATE_LIBMODSECURITY";
const INSTALL_HINT: &str = "install libmodsecurity3 and modsecurity-crs (Debian/Ubuntu: \
                            apt-get install libmodsecurity3 modsecurity-crs)";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum WafMode {
    /// Refuse matching requests with 403.
    #[default]
    Block,
    /// Log what would have been refused; forward everything.
    Detect,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum OverLimit {
    /// A body over `body_limit` gets 413.
    #[default]
    Reject,
    /// Only its first `body_limit` bytes are inspected; all of it is forwarded.
    Partial,
}

/// The top-level `waf:` of the normalized config.
#[derive(Debug, Clone, Deserialize)]
pub struct WafConfig {
    /// "crs" (the system CRS with our setup) and/or absolute paths of `.conf` files.
    pub rules: Vec<String>,
    #[serde(default)]
    pub mode: WafMode,
    #[serde(default = "default_paranoia")]
    pub paranoia: u8,
    #[serde(default = "default_threshold")]
    pub anomaly_threshold: u32,
    /// Bytes of request body inspected.
    pub body_limit: u64,
    #[serde(default)]
    pub body_over_limit: OverLimit,
}

fn default_paranoia() -> u8 {
    1
}

fn default_threshold() -> u32 {
    5
}

/// `routes[].waf` of the normalized config: off, or overrides of the top-level settings.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RouteWafConfig {
    #[serde(default)]
    pub off: bool,
    #[serde(default)]
    pub mode: Option<WafMode>,
    #[serde(default)]
    pub paranoia: Option<u8>,
    #[serde(default)]
    pub anomaly_threshold: Option<u32>,
    #[serde(default)]
    pub exclude_rules: Vec<u64>,
    #[serde(default)]
    pub exclude_args: Vec<String>,
}

/// The effective settings of one rules set: routes with equal keys share it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct ProfileKey {
    mode: WafMode,
    paranoia: u8,
    anomaly_threshold: u32,
    exclude_rules: Vec<u64>,
    exclude_args: Vec<String>,
}

impl ProfileKey {
    fn of(global: &WafConfig, route: Option<&RouteWafConfig>) -> Option<ProfileKey> {
        let r = route.cloned().unwrap_or_default();
        if r.off {
            return None;
        }
        let mut exclude_rules = r.exclude_rules;
        exclude_rules.sort_unstable();
        exclude_rules.dedup();
        let mut exclude_args = r.exclude_args;
        exclude_args.sort();
        exclude_args.dedup();
        Some(ProfileKey {
            mode: r.mode.unwrap_or(global.mode),
            paranoia: r.paranoia.unwrap_or(global.paranoia),
            anomaly_threshold: r.anomaly_threshold.unwrap_or(global.anomaly_threshold),
            exclude_rules,
            exclude_args,
        })
    }
}

/// Quote a value for a ModSecurity directive argument in double quotes.
fn quoted(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// The rules text of one profile: engine settings, the CRS's setup variables, the rule
/// files, then the route's exclusions (which must follow the rules they change).
fn rules_text(global: &WafConfig, key: &ProfileKey, crs_dir: &str) -> String {
    let engine = match key.mode {
        WafMode::Block => "On",
        WafMode::Detect => "DetectionOnly",
    };
    // Bodies are cut to `body_limit` before they get here; the engine's own limit must not
    // refuse what we decided to inspect.
    let limit = global.body_limit.max(1);
    let mut t = format!(
        "SecRuleEngine {engine}\n\
         SecRequestBodyAccess On\n\
         SecRequestBodyLimit {limit}\n\
         SecRequestBodyNoFilesLimit {limit}\n\
         SecRequestBodyLimitAction ProcessPartial\n\
         SecRequestBodyJsonDepthLimit 512\n\
         SecResponseBodyAccess Off\n\
         SecAuditEngine Off\n\
         SecArgumentSeparator &\n\
         SecCookieFormat 0\n\
         SecPcreMatchLimit 100000\n\
         SecPcreMatchLimitRecursion 100000\n"
    );
    // The body processors and body-error rules of ModSecurity's recommended configuration:
    // a JSON or XML body that does not parse, or a multipart body that breaks the strict
    // checks, is refused (400) instead of passing uninspected.
    t.push_str(concat!(
        "SecRule REQUEST_HEADERS:Content-Type \"^(?:application(?:/soap\\+|/)|text/)xml\" ",
        "\"id:200000,phase:1,t:none,t:lowercase,pass,nolog,ctl:requestBodyProcessor=XML\"\n",
        "SecRule REQUEST_HEADERS:Content-Type \"^application/(?:[a-z0-9.+-]+\\+)?json\" ",
        "\"id:200001,phase:1,t:none,t:lowercase,pass,nolog,ctl:requestBodyProcessor=JSON\"\n",
        "SecRule REQBODY_ERROR \"!@eq 0\" ",
        "\"id:200002,phase:2,t:none,log,deny,status:400,msg:'Failed to parse request body.',severity:2\"\n",
        "SecRule MULTIPART_STRICT_ERROR \"!@eq 0\" ",
        "\"id:200003,phase:2,t:none,log,deny,status:400,msg:'Multipart request body failed strict validation',severity:2\"\n",
        "SecDefaultAction \"phase:1,log,auditlog,pass\"\n",
        "SecDefaultAction \"phase:2,log,auditlog,pass\"\n",
        "SecAction \"id:900990,phase:1,nolog,pass,t:none,setvar:tx.crs_setup_version=334\"\n",
    ));
    t.push_str(&format!(
        "SecAction \"id:900000,phase:1,nolog,pass,t:none,setvar:tx.paranoia_level={p}\"\n\
         SecAction \"id:900110,phase:1,nolog,pass,t:none,\
         setvar:tx.inbound_anomaly_score_threshold={a},setvar:tx.outbound_anomaly_score_threshold=4\"\n",
        p = key.paranoia,
        a = key.anomaly_threshold,
    ));
    for source in &global.rules {
        if source == "crs" {
            if Path::new(CRS_LOCAL_BEFORE).is_file() {
                t.push_str(&format!("Include {CRS_LOCAL_BEFORE}\n"));
            }
            t.push_str(&format!("Include {crs_dir}/*.conf\n"));
            if Path::new(CRS_LOCAL_AFTER).is_file() {
                t.push_str(&format!("Include {CRS_LOCAL_AFTER}\n"));
            }
        } else {
            // The directive takes the path as is (no quoting): the control plane refuses
            // paths with spaces.
            t.push_str(&format!("Include {source}\n"));
        }
    }
    for id in &key.exclude_rules {
        t.push_str(&format!("SecRuleRemoveById {id}\n"));
    }
    for arg in &key.exclude_args {
        // Every CRS rule carries this tag; ARGS covers query, form and JSON arguments.
        t.push_str(&format!(
            "SecRuleUpdateTargetByTag \"OWASP_CRS\" {}\n",
            quoted(&format!("!ARGS:{arg}"))
        ));
    }
    t
}

// --- the C API --------------------------------------------------------------------------

#[repr(C)]
struct Intervention {
    status: c_int,
    pause: c_int,
    url: *mut c_char,
    log: *mut c_char,
    disruptive: c_int,
}

type LogCb = unsafe extern "C" fn(*mut c_void, *const c_void);

/// libmodsecurity's entry points, resolved once; the library stays loaded for the life of
/// the process.
struct Api {
    msc_init: unsafe extern "C" fn() -> *mut c_void,
    msc_set_connector_info: unsafe extern "C" fn(*mut c_void, *const c_char),
    msc_set_log_cb: unsafe extern "C" fn(*mut c_void, LogCb),
    msc_create_rules_set: unsafe extern "C" fn() -> *mut c_void,
    msc_rules_add: unsafe extern "C" fn(*mut c_void, *const c_char, *mut *const c_char) -> c_int,
    msc_rules_cleanup: unsafe extern "C" fn(*mut c_void) -> c_int,
    msc_new_transaction_with_id:
        unsafe extern "C" fn(*mut c_void, *mut c_void, *mut c_char, *mut c_void) -> *mut c_void,
    msc_process_connection:
        unsafe extern "C" fn(*mut c_void, *const c_char, c_int, *const c_char, c_int) -> c_int,
    msc_process_uri: unsafe extern "C" fn(*mut c_void, *const c_char, *const c_char, *const c_char) -> c_int,
    msc_add_n_request_header: unsafe extern "C" fn(*mut c_void, *const u8, usize, *const u8, usize) -> c_int,
    msc_process_request_headers: unsafe extern "C" fn(*mut c_void) -> c_int,
    msc_append_request_body: unsafe extern "C" fn(*mut c_void, *const u8, usize) -> c_int,
    msc_process_request_body: unsafe extern "C" fn(*mut c_void) -> c_int,
    msc_intervention: unsafe extern "C" fn(*mut c_void, *mut Intervention) -> c_int,
    msc_process_logging: unsafe extern "C" fn(*mut c_void) -> c_int,
    msc_transaction_cleanup: unsafe extern "C" fn(*mut c_void),
    /// The process's one ModSecurity instance (it holds the log callback).
    modsec: *mut c_void,
}

// SAFETY: the function pointers are plain code addresses; the ModSecurity instance is only
// read by libmodsecurity after `msc_init` and the callback setup made here.
unsafe impl Send for Api {}
unsafe impl Sync for Api {}

static API: OnceLock<Result<Api, String>> = OnceLock::new();

fn api() -> Result<&'static Api, String> {
    API.get_or_init(load).as_ref().map_err(Clone::clone)
}

fn load() -> Result<Api, String> {
    // SAFETY: loading libmodsecurity runs its (C++) static initializers, nothing else.
    let name = std::env::var_os(LIBRARY_ENV).unwrap_or_else(|| LIBRARY.into());
    let lib = unsafe { libloading::Library::new(&name) }
        .map_err(|e| format!("the WAF needs libmodsecurity ({e}); {INSTALL_HINT}"))?;
    // Never unloaded: rules sets and transactions may live until the process exits.
    let lib: &'static libloading::Library = Box::leak(Box::new(lib));
    macro_rules! sym {
        ($name:ident) => {
            // SAFETY: the type is the one declared in libmodsecurity's headers.
            *unsafe { lib.get(concat!(stringify!($name), "\0").as_bytes()) }
                .map_err(|e| format!("libmodsecurity lacks {}: {e}", stringify!($name)))?
        };
    }
    let mut api = Api {
        msc_init: sym!(msc_init),
        msc_set_connector_info: sym!(msc_set_connector_info),
        msc_set_log_cb: sym!(msc_set_log_cb),
        msc_create_rules_set: sym!(msc_create_rules_set),
        msc_rules_add: sym!(msc_rules_add),
        msc_rules_cleanup: sym!(msc_rules_cleanup),
        msc_new_transaction_with_id: sym!(msc_new_transaction_with_id),
        msc_process_connection: sym!(msc_process_connection),
        msc_process_uri: sym!(msc_process_uri),
        msc_add_n_request_header: sym!(msc_add_n_request_header),
        msc_process_request_headers: sym!(msc_process_request_headers),
        msc_append_request_body: sym!(msc_append_request_body),
        msc_process_request_body: sym!(msc_process_request_body),
        msc_intervention: sym!(msc_intervention),
        msc_process_logging: sym!(msc_process_logging),
        msc_transaction_cleanup: sym!(msc_transaction_cleanup),
        modsec: std::ptr::null_mut(),
    };
    // SAFETY: documented initialization sequence of the C API.
    unsafe {
        api.modsec = (api.msc_init)();
        if api.modsec.is_null() {
            return Err("libmodsecurity failed to initialize".into());
        }
        let info = CString::new(format!("ferrogate v{}", env!("CARGO_PKG_VERSION"))).expect("no NUL");
        (api.msc_set_connector_info)(api.modsec, info.as_ptr());
        (api.msc_set_log_cb)(api.modsec, on_rule_message);
    }
    Ok(api)
}

// --- what matched --------------------------------------------------------------------------

/// What a transaction's matched rules said, gathered from libmodsecurity's log callback.
/// Only rule ids, variable names and the score are kept: the messages also quote the
/// matched data (the payload), which must not reach the logs.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Matches {
    pub rule_ids: Vec<u64>,
    pub variables: Vec<String>,
    pub anomaly_score: Option<u32>,
}

impl Matches {
    fn add_message(&mut self, msg: &str) {
        if let Some(id) = bracket_field(msg, "id").and_then(|s| s.parse().ok()) {
            if !self.rule_ids.contains(&id) {
                self.rule_ids.push(id);
            }
        }
        // "against variable `ARGS:q'", or for libinjection's operators only the data field:
        // "found within ARGS:q: <payload>" (the payload is cut off here).
        let var = between(msg, "against variable `", "'")
            .or_else(|| bracket_field(msg, "data").and_then(|d| between(d, "found within ", ": ")));
        if let Some(var) = var {
            // TX variables are the rules' own bookkeeping (the anomaly score), not the request's.
            let ours = var.starts_with("TX:");
            if !var.is_empty()
                && !ours
                && !self.variables.iter().any(|v| v == var)
                && self.variables.len() < 16
            {
                self.variables.push(var.to_string());
            }
        }
        // CRS 949110 ("Total Score: N") and 980130 ("Total Inbound Score: N - ...").
        for marker in ["Total Score: ", "Total Inbound Score: "] {
            if let Some(rest) = msg.find(marker).map(|i| &msg[i + marker.len()..]) {
                let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
                if let Ok(n) = digits.parse::<u32>() {
                    self.anomaly_score = Some(self.anomaly_score.map_or(n, |s| s.max(n)));
                }
            }
        }
    }
}

/// The value of `[name "value"]` in a rule message.
fn bracket_field<'m>(msg: &'m str, name: &str) -> Option<&'m str> {
    between(msg, &format!("[{name} \""), "\"]")
}

fn between<'m>(msg: &'m str, start: &str, end: &str) -> Option<&'m str> {
    let from = msg.find(start)? + start.len();
    let len = msg[from..].find(end)?;
    Some(&msg[from..from + len])
}

unsafe extern "C" fn on_rule_message(data: *mut c_void, msg: *const c_void) {
    if data.is_null() || msg.is_null() {
        return;
    }
    // SAFETY: `data` is the `Matches` box of the transaction being evaluated (see
    // `Inspection::new`), alive and used by no one else during the call; `msg` is a C
    // string (the text log property, which `msc_set_log_cb` selects).
    let (matches, text) = unsafe { (&mut *(data as *mut Matches), CStr::from_ptr(msg as *const c_char)) };
    matches.add_message(&text.to_string_lossy());
}

// --- rules sets and transactions -----------------------------------------------------------

struct RulesSet(*mut c_void);

// SAFETY: after loading, a rules set is only read; transactions reference it and it is
// freed when the last engine holding it is dropped (after its requests finished).
unsafe impl Send for RulesSet {}
unsafe impl Sync for RulesSet {}

impl Drop for RulesSet {
    fn drop(&mut self) {
        if let Ok(api) = api() {
            // SAFETY: created by msc_create_rules_set; no transaction outlives the engine.
            unsafe { (api.msc_rules_cleanup)(self.0) };
        }
    }
}

/// One compiled rules set and the settings it was built for.
pub struct Profile {
    rules: RulesSet,
    pub mode: WafMode,
    pub paranoia: u8,
    pub body_limit: u64,
    pub over_limit: OverLimit,
}

impl Profile {
    fn compile(global: &WafConfig, key: &ProfileKey) -> Result<Profile, String> {
        let api = api()?;
        let text = CString::new(rules_text(global, key, CRS_RULES_DIR)).map_err(|e| e.to_string())?;
        // SAFETY: C API use as documented; `error` is a malloc'd string on failure.
        unsafe {
            let rules = (api.msc_create_rules_set)();
            let rules = RulesSet(rules);
            let mut error: *const c_char = std::ptr::null();
            let n = (api.msc_rules_add)(rules.0, text.as_ptr(), &mut error);
            if n < 0 {
                let reason = if error.is_null() {
                    "the rules do not compile".to_string()
                } else {
                    let r = CStr::from_ptr(error).to_string_lossy().trim().to_string();
                    libc::free(error as *mut c_void);
                    r
                };
                return Err(reason);
            }
            Ok(Profile {
                rules,
                mode: key.mode,
                paranoia: key.paranoia,
                body_limit: global.body_limit,
                over_limit: global.body_over_limit,
            })
        }
    }
}

/// The compiled WAF of one config: a profile per route (None: the WAF is off there).
pub struct Waf {
    routes: Vec<Option<Arc<Profile>>>,
}

impl Waf {
    /// Compile the rules for `routes` (the route configs' `waf` settings, in order).
    pub fn build(global: &WafConfig, routes: &[Option<&RouteWafConfig>]) -> Result<Waf, Vec<ConfigProblem>> {
        let mut problems = Vec::new();
        if let Err(e) = api() {
            return Err(vec![ConfigProblem::new("waf", e)]);
        }
        if global.rules.is_empty() {
            problems.push(ConfigProblem::new("waf.rules", "give 'crs' or rule files"));
        }
        if global.rules.iter().any(|r| r == "crs") && !Path::new(CRS_RULES_DIR).is_dir() {
            problems.push(ConfigProblem::new(
                "waf.rules",
                format!("the OWASP CRS is not installed ({CRS_RULES_DIR} is missing); {INSTALL_HINT}"),
            ));
        }
        let paranoia = std::iter::once(("waf".to_string(), global.paranoia)).chain(
            routes
                .iter()
                .enumerate()
                .filter_map(|(i, r)| Some((format!("routes[{i}].waf"), r.as_ref()?.paranoia?))),
        );
        for (at, p) in paranoia {
            if !(1..=4).contains(&p) {
                problems.push(ConfigProblem::new(
                    format!("{at}.paranoia"),
                    format!("{p} is not 1 to 4"),
                ));
            }
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        let mut compiled: HashMap<ProfileKey, Arc<Profile>> = HashMap::new();
        // The top-level settings first: a rules file that does not compile is reported once,
        // against `waf.rules`; what fails after that is a route's exclusions.
        let base = ProfileKey::of(global, None).expect("no route settings: on");
        match Profile::compile(global, &base) {
            Ok(p) => {
                compiled.insert(base, Arc::new(p));
            }
            Err(e) => {
                return Err(vec![ConfigProblem::new(
                    "waf.rules",
                    format!("the rules do not compile: {e}"),
                )])
            }
        }
        let mut out = Vec::with_capacity(routes.len());
        for (i, r) in routes.iter().enumerate() {
            let Some(key) = ProfileKey::of(global, *r) else {
                out.push(None);
                continue;
            };
            if let Some(p) = compiled.get(&key) {
                out.push(Some(p.clone()));
                continue;
            }
            match Profile::compile(global, &key) {
                Ok(p) => {
                    let p = Arc::new(p);
                    compiled.insert(key, p.clone());
                    out.push(Some(p));
                }
                Err(e) => {
                    problems.push(ConfigProblem::new(
                        format!("routes[{i}].waf"),
                        format!("these settings do not compile: {e}"),
                    ));
                    out.push(None);
                }
            }
        }
        if problems.is_empty() {
            Ok(Waf { routes: out })
        } else {
            Err(problems)
        }
    }

    /// The profile of route `index`, when the WAF is on there.
    pub fn profile(&self, index: usize) -> Option<&Arc<Profile>> {
        self.routes.get(index).and_then(Option::as_ref)
    }
}

/// A transaction between its headers phase and its body phase.
pub struct Inspection {
    tx: *mut c_void,
    profile: Arc<Profile>,
    matches: Box<Matches>,
    api: &'static Api,
}

// SAFETY: a transaction has no thread affinity; it is used by one thread at a time (it is
// not Sync), moving with the request's future.
unsafe impl Send for Inspection {}

/// How an inspection ended.
pub enum Verdict {
    Pass,
    /// Refused with this status (403 from the CRS, 400 for a body that does not parse).
    Refuse(u16),
}

/// Request facts the transaction needs besides the head.
pub struct Client<'a> {
    pub ip: &'a str,
    pub port: u16,
    /// Becomes the transaction's id (ModSecurity's `unique_id`).
    pub request_id: &'a str,
}

impl Inspection {
    /// Start a transaction and run the connection, URI and header phases. `uri` is the
    /// request target as the client sent it (before path normalization: encodings and dot
    /// segments are evidence).
    pub fn start(
        profile: &Arc<Profile>,
        client: Client<'_>,
        uri: &str,
        parts: &request::Parts,
    ) -> (Inspection, Verdict) {
        let api = api().expect("a profile exists only when the library loaded");
        let mut matches = Box::<Matches>::default();
        let cstr = |s: &str| CString::new(s.replace('\0', "")).expect("NULs removed");
        // SAFETY: C API use as documented; the strings outlive each call, the Matches box
        // outlives the transaction (cleaned up in Drop before the box is freed).
        unsafe {
            // Our request id as the transaction's: without one, libmodsecurity seeds a
            // random generator per transaction (a few percent of its time).
            let id = cstr(client.request_id);
            let tx = (api.msc_new_transaction_with_id)(
                api.modsec,
                profile.rules.0,
                id.as_ptr() as *mut c_char,
                &mut *matches as *mut Matches as *mut c_void,
            );
            let mut me = Inspection {
                tx,
                profile: profile.clone(),
                matches,
                api,
            };
            let ip = cstr(client.ip);
            let server = cstr("0.0.0.0");
            (api.msc_process_connection)(tx, ip.as_ptr(), client.port.into(), server.as_ptr(), 0);
            let version = match parts.version {
                http::Version::HTTP_2 => "2.0",
                http::Version::HTTP_10 => "1.0",
                _ => "1.1",
            };
            let (uri, method, version) = (cstr(uri), cstr(parts.method.as_str()), cstr(version));
            (api.msc_process_uri)(tx, uri.as_ptr(), method.as_ptr(), version.as_ptr());
            for (name, value) in &parts.headers {
                let (n, v) = (name.as_str().as_bytes(), value.as_bytes());
                (api.msc_add_n_request_header)(tx, n.as_ptr(), n.len(), v.as_ptr(), v.len());
            }
            if !parts.headers.contains_key(http::header::HOST) {
                // HTTP/2 carries the host in :authority; the CRS expects a Host header.
                if let Some(a) = parts.uri.authority() {
                    let (n, v) = (b"Host", a.as_str().as_bytes());
                    (api.msc_add_n_request_header)(tx, n.as_ptr(), n.len(), v.as_ptr(), v.len());
                }
            }
            (api.msc_process_request_headers)(tx);
            let verdict = me.intervention();
            (me, verdict)
        }
    }

    /// Run the body phase on `body` (already cut to the profile's limit; empty when the
    /// request has none).
    pub fn body(&mut self, body: &[u8]) -> Verdict {
        // SAFETY: the transaction is alive (Drop has not run).
        unsafe {
            if !body.is_empty() {
                (self.api.msc_append_request_body)(self.tx, body.as_ptr(), body.len());
            }
            (self.api.msc_process_request_body)(self.tx);
        }
        self.intervention()
    }

    fn intervention(&mut self) -> Verdict {
        let mut it = Intervention {
            status: 200,
            pause: 0,
            url: std::ptr::null_mut(),
            log: std::ptr::null_mut(),
            disruptive: 0,
        };
        // SAFETY: `it` is a valid struct; the strings it may return are malloc'd.
        let hit = unsafe { (self.api.msc_intervention)(self.tx, &mut it) };
        unsafe {
            if !it.url.is_null() {
                libc::free(it.url as *mut c_void);
            }
            if !it.log.is_null() {
                let text = CStr::from_ptr(it.log).to_string_lossy().into_owned();
                self.matches.add_message(&text);
                libc::free(it.log as *mut c_void);
            }
        }
        if hit != 0 && it.disruptive != 0 {
            let status = if (400..600).contains(&it.status) {
                it.status as u16
            } else {
                403
            };
            Verdict::Refuse(status)
        } else {
            Verdict::Pass
        }
    }

    /// Finish the transaction (logging phase) and say what matched.
    pub fn finish(mut self) -> Matches {
        // SAFETY: the transaction is alive.
        unsafe { (self.api.msc_process_logging)(self.tx) };
        std::mem::take(&mut *self.matches)
    }

    pub fn profile(&self) -> &Profile {
        &self.profile
    }
}

impl Drop for Inspection {
    fn drop(&mut self) {
        // SAFETY: created by msc_new_transaction_with_id, cleaned up once.
        unsafe { (self.api.msc_transaction_cleanup)(self.tx) };
    }
}

/// The answer to a refused request and the event that records why.
pub fn refusal(status: u16, matches: &Matches) -> GatewayError {
    if status == 400 && matches.rule_ids.iter().any(|id| matches!(id, 200002 | 200003)) {
        return GatewayError::new(
            ErrorKind::BadRequest,
            "the request body could not be parsed as its Content-Type says",
        );
    }
    GatewayError::new(
        ErrorKind::WafBlocked,
        "the request was refused by the web application firewall",
    )
}

/// The structured event of a request the WAF matched: ids, score, variable names; never
/// the matched data.
fn event_fields(
    request_id: &str,
    route: &str,
    mode: WafMode,
    paranoia: u8,
    matches: &Matches,
    refused: Option<u16>,
) -> serde_json::Value {
    serde_json::json!({
        "request_id": request_id,
        "route": route,
        "mode": match mode { WafMode::Block => "block", WafMode::Detect => "detect" },
        "paranoia": paranoia,
        "anomaly_score": matches.anomaly_score,
        "rule_ids": matches.rule_ids,
        "variables": matches.variables,
        "status": refused,
    })
}

/// Cut `body` to what the profile inspects; Err when it is over the limit and the profile
/// refuses such bodies.
pub fn inspected_part<'b>(profile: &Profile, body: &'b Bytes) -> Result<&'b [u8], GatewayError> {
    cut_to(profile.body_limit, profile.over_limit, body)
}

fn cut_to(limit: u64, over: OverLimit, body: &[u8]) -> Result<&[u8], GatewayError> {
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    if body.len() <= limit {
        return Ok(body);
    }
    match over {
        OverLimit::Partial => Ok(&body[..limit]),
        OverLimit::Reject => Err(GatewayError::new(
            ErrorKind::BodyTooLarge,
            format!("request body is above the firewall's inspection limit of {limit} bytes"),
        )),
    }
}

// --- the request path ----------------------------------------------------------------------

/// Start inspecting a request on a route with the WAF on: connection, URI (as the client
/// sent it) and headers. Refused here, the request's body is never read.
pub fn begin(
    profile: &Arc<Profile>,
    ctx: &RequestCtx,
    trusted: &[ipnet::IpNet],
    raw_uri: &http::Uri,
    parts: &request::Parts,
) -> Result<Inspection, GatewayError> {
    let ip = crate::limiter::real_client_ip(ctx.client.ip(), &parts.headers, trusted)
        .map_or_else(|| ctx.client.ip(), crate::ip_restriction::canonical)
        .to_string();
    let target = raw_uri.path_and_query().map_or("/", |pq| pq.as_str());
    let (inspection, verdict) = Inspection::start(
        profile,
        Client {
            ip: &ip,
            port: ctx.client.port(),
            request_id: ctx.request_id.to_str().unwrap_or(""),
        },
        target,
        parts,
    );
    match verdict {
        Verdict::Pass => Ok(inspection),
        refused => Err(conclude(inspection, refused, ctx).expect_err("refused")),
    }
}

/// Read the start of a streamed body for inspection: up to just over `limit` bytes (so
/// that a body over the limit is known to be). What is read is forwarded as the body's
/// first frame. Request trailers, rare in practice, are not kept. Over `max_body` (the
/// gateway's body limit; 0: none) is a 413.
pub async fn read_prefix(
    first: Option<Frame<Bytes>>,
    body: &mut InboundBody,
    limit: u64,
    max_body: u64,
    timeout: Duration,
) -> Result<Bytes, GatewayError> {
    let mut parts: Vec<Bytes> = first.and_then(|f| f.into_data().ok()).into_iter().collect();
    let mut total: u64 = parts.iter().map(|p| p.len() as u64).sum();
    let read = async {
        while total <= limit {
            match body.frame().await {
                None => break,
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        total += data.len() as u64;
                        parts.push(data);
                    }
                }
                Some(Err(e)) => return Err(crate::body::read_failed(&*e)),
            }
        }
        Ok(())
    };
    match tokio::time::timeout(timeout, read).await {
        Err(_) => {
            return Err(GatewayError::new(
                ErrorKind::RequestTimeout,
                "timed out reading the request body",
            ))
        }
        Ok(r) => r?,
    }
    // What is read here goes out as one frame, which the body's own count does not check.
    if max_body > 0 && total > max_body {
        return Err(GatewayError::new(
            ErrorKind::BodyTooLarge,
            format!("request body is above the limit of {max_body} bytes"),
        ));
    }
    Ok(match parts.len() {
        0 => Bytes::new(),
        1 => parts.pop().expect("one part"),
        _ => parts.concat().into(),
    })
}

/// Inspect the body (`body` is what was read of it) and end the transaction: Err when the
/// request is refused.
pub fn inspect_body(mut inspection: Inspection, body: &Bytes, ctx: &RequestCtx) -> Result<(), GatewayError> {
    let part = inspected_part(inspection.profile(), body)?;
    let verdict = inspection.body(part);
    conclude(inspection, verdict, ctx)
}

/// End the transaction; log what matched when the request is refused (or would have been,
/// in detect mode).
fn conclude(inspection: Inspection, verdict: Verdict, ctx: &RequestCtx) -> Result<(), GatewayError> {
    let mode = inspection.profile().mode;
    let paranoia = inspection.profile().paranoia;
    let matches = inspection.finish();
    let route = ctx.route.as_ref().map_or("", |r| r.name.as_str());
    let request_id = ctx.request_id.to_str().unwrap_or("");
    let fields = |status| event_fields(request_id, route, mode, paranoia, &matches, status);
    match verdict {
        Verdict::Refuse(status) => {
            crate::server::log_event("warn", "waf_blocked", fields(Some(status)));
            Err(refusal(status, &matches))
        }
        Verdict::Pass => {
            // The CRS's blocking evaluation (949110) matched, or a rule of the user's own
            // set did: what block mode would have refused.
            let would_block = matches.rule_ids.contains(&949110)
                || (matches.anomaly_score.is_none() && !matches.rule_ids.is_empty());
            if mode == WafMode::Detect && would_block {
                crate::server::log_event("info", "waf_detected", fields(None));
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn global() -> WafConfig {
        WafConfig {
            rules: vec!["crs".into()],
            mode: WafMode::Block,
            paranoia: 1,
            anomaly_threshold: 5,
            body_limit: 1024,
            body_over_limit: OverLimit::Reject,
        }
    }

    #[test]
    fn route_settings_override_the_global_ones_and_off_means_none() {
        let g = global();
        assert!(ProfileKey::of(
            &g,
            Some(&RouteWafConfig {
                off: true,
                ..Default::default()
            })
        )
        .is_none());
        let k = ProfileKey::of(
            &g,
            Some(&RouteWafConfig {
                paranoia: Some(3),
                exclude_rules: vec![942100, 941100, 942100],
                ..Default::default()
            }),
        )
        .unwrap();
        assert_eq!((k.paranoia, k.anomaly_threshold, k.mode), (3, 5, WafMode::Block));
        assert_eq!(k.exclude_rules, vec![941100, 942100]);
        // Equal settings in any order share one rules set.
        let a = RouteWafConfig {
            exclude_args: vec!["b".into(), "a".into()],
            ..Default::default()
        };
        let b = RouteWafConfig {
            exclude_args: vec!["a".into(), "b".into()],
            ..Default::default()
        };
        assert_eq!(ProfileKey::of(&g, Some(&a)), ProfileKey::of(&g, Some(&b)));
        assert_eq!(
            ProfileKey::of(&g, None),
            ProfileKey::of(&g, Some(&RouteWafConfig::default()))
        );
    }

    #[test]
    fn rules_text_sets_paranoia_and_puts_exclusions_after_the_rules() {
        let g = global();
        let key = ProfileKey {
            mode: WafMode::Detect,
            paranoia: 2,
            anomaly_threshold: 7,
            exclude_rules: vec![942100],
            exclude_args: vec!["q\"x".into()],
        };
        let t = rules_text(&g, &key, "/crs");
        assert!(t.starts_with("SecRuleEngine DetectionOnly\n"));
        assert!(t.contains("setvar:tx.paranoia_level=2\""));
        assert!(t.contains("setvar:tx.inbound_anomaly_score_threshold=7,"));
        let include = t.find("Include /crs/*.conf\n").unwrap();
        assert!(t.find("SecRuleRemoveById 942100").unwrap() > include);
        assert!(t.contains("SecRuleUpdateTargetByTag \"OWASP_CRS\" \"!ARGS:q\\\"x\""));
    }

    #[test]
    fn messages_give_ids_variables_and_score_but_not_the_payload() {
        let mut m = Matches::default();
        m.add_message(
            "ModSecurity: Warning. detected SQLi using libinjection. Matched \"Operator `DetectSQLi' \
             with parameter `' against variable `ARGS:q' (Value: `1' or '1'='1' ) [file \"x.conf\"] \
             [line \"1\"] [id \"942100\"] [rev \"\"] [msg \"SQL Injection Attack Detected via libinjection\"] \
             [data \"Matched Data: s&sos found within ARGS:q: 1' or '1'='1\"]",
        );
        m.add_message(
            "Matched \"Operator `Ge' with parameter `5' against variable `TX:ANOMALY_SCORE' \
             [id \"949110\"] [msg \"Inbound Anomaly Score Exceeded (Total Score: 5)\"]",
        );
        m.add_message("[id \"941100\"] [data \"Matched Data: XSS data found within ARGS:msg: <script>\"]");
        m.add_message("[id \"942100\"] Matched against variable `ARGS:q' ");
        assert_eq!(m.rule_ids, vec![942100, 949110, 941100]);
        assert_eq!(m.variables, vec!["ARGS:q".to_string(), "ARGS:msg".to_string()]);
        assert_eq!(m.anomaly_score, Some(5));
    }

    #[test]
    fn bodies_over_the_limit_are_refused_or_cut() {
        let body = vec![b'a'; 2000];
        assert_eq!(cut_to(1024, OverLimit::Partial, &body).unwrap().len(), 1024);
        assert_eq!(
            cut_to(1024, OverLimit::Reject, &body).unwrap_err().kind,
            ErrorKind::BodyTooLarge
        );
        assert_eq!(cut_to(1024, OverLimit::Reject, b"x").unwrap(), b"x");
    }
}
