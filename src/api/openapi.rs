//! The OpenAPI document (utoipa): every operation of every API, the security schemes, and what the
//! middleware in front of the operations may answer. Served at `/openapi.json` (Swagger UI at `/docs`, see
//! `docs.rs`) and snapshotted in `docs/openapi.json`.

use utoipa::OpenApi;

use super::{
    compat, execute, files, gateway, jupyter_compat, kernel_ws, mcp, network, packages, session_compat, sessions,
    system,
};

#[derive(OpenApi)]
#[openapi(
    info(title = "kernelbox", description = "Run untrusted code in stateful Jupyter kernels, one sealed container per session."),
    paths(
        sessions::create, sessions::list, sessions::get, sessions::delete, sessions::interrupt, sessions::restart,
        network::get, network::put,
        packages::install, execute::execute, execute::input, files::list, files::download, files::upload, files::delete, files::notebook, system::healthz, system::readyz, system::languages, system::metrics_text,
        session_compat::start_session, session_compat::execute, session_compat::install_package, session_compat::reset,
        session_compat::end_session, jupyter_compat::list_kernel_specs, jupyter_compat::execute, jupyter_compat::upload,
        jupyter_compat::upload_long, jupyter_compat::download, jupyter_compat::download_signed, jupyter_compat::health, jupyter_compat::health_root,
        mcp::doc::post, mcp::doc::get, mcp::doc::delete,
        gateway::version, gateway::kernelspecs, gateway::list, gateway::start, gateway::get, gateway::delete,
        gateway::interrupt, gateway::restart, kernel_ws::channels,
    ),
    components(schemas(
        crate::error::ErrorBody,
        compat::DetailBody,
        crate::kernel::Output,
        crate::kernel::ErrorInfo,
        crate::session::AutoRestartNotice,
        crate::egress::session::Blocked
    )),
    modifiers(&Security),
)]
pub struct ApiDoc;

struct Security;
impl utoipa::Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        components
            .add_security_scheme("api_key", SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new("X-API-Key"))));
        guarded_responses(openapi);
        known_languages(openapi);
    }
}

/// `language` is one of the catalog's names: saying so lets clients (and the fuzzer) know the valid
/// values instead of guessing.
fn known_languages(openapi: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::{RefOr, Schema};
    let Some(components) = openapi.components.as_mut() else { return };
    let Some(RefOr::T(Schema::Object(request))) = components.schemas.get_mut("SessionRequest") else { return };
    if let Some(RefOr::T(Schema::Object(language))) = request.properties.get_mut("language") {
        let names = crate::images::Catalog::new("").languages.into_iter().map(|l| serde_json::Value::from(l.name));
        language.enum_values = Some(names.collect());
    }
}

/// What the middleware in front of every `/v1` and compatibility operation may answer, written once here
/// rather than on each handler: the key (401), the per-key limits (429 with `Retry-After`) and, with a body, the
/// body limits.
fn guarded_responses(openapi: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::security::SecurityRequirement;
    use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
    let error = |description: &str| {
        ResponseBuilder::new()
            .description(description)
            .content("application/json", ContentBuilder::new().schema(Some(Ref::from_schema_name("ErrorBody"))).build())
            .build()
    };
    let detail = |description: &str| {
        ResponseBuilder::new()
            .description(description)
            .content(
                "application/json",
                ContentBuilder::new().schema(Some(Ref::from_schema_name("DetailBody"))).build(),
            )
            .build()
    };
    let guarded = |path: &str| {
        let open = ["/healthz", "/readyz", "/metrics", "/health", "/jupyter/health"];
        !open.contains(&path) && !path.starts_with("/docs") && path != "/openapi.json"
    };
    for (path, item) in openapi.paths.paths.iter_mut().filter(|(path, _)| guarded(path)) {
        let compat = !path.starts_with("/v1/") && path != "/mcp" && !path.starts_with("/api");
        let error = |description: &str| if compat { detail(description) } else { error(description) };
        for op in
            [&mut item.get, &mut item.put, &mut item.post, &mut item.delete, &mut item.patch].into_iter().flatten()
        {
            op.security = Some(vec![
                SecurityRequirement::new("bearer", Vec::<String>::new()),
                SecurityRequirement::new("api_key", Vec::<String>::new()),
            ]);
            let mut add = |status: &str, description: &str| {
                op.responses.responses.entry(status.to_owned()).or_insert_with(|| error(description).into());
            };
            add("401", "no API key, or not a valid one (when the server has keys)");
            add(
                "429",
                "a limit of this API key (session creates, package installs, upload bytes, the request limit when \
                 on: see `Retry-After`), or a limit of the server",
            );
            let json_body = matches!(&op.request_body, Some(utoipa::openapi::RefOr::T(b)) if b.content.contains_key("application/json"));
            if path == "/mcp" {
                // `/mcp` reads its own bodies (rmcp): its answers are listed on it.
            } else if path.starts_with("/api") {
                // The gateway API takes any body it can parse (its answers are listed on it).
                if op.request_body.is_some() {
                    add("408", "the body did not arrive in time");
                    add("413", "the body is larger than 16 MiB");
                }
            } else if op.request_body.is_some() && compat {
                add("408", "the body did not arrive in time");
                add("413", "the body is larger than 16 MiB");
                add("422", "the body is not what this operation takes, or asks for something not allowed");
            } else if json_body {
                add("400", "the body is not valid JSON for this operation");
                add("408", "the body did not arrive in time");
                add("413", "the body is larger than 16 MiB");
                add("415", "the body is not `application/json`");
                add("422", "the request is well-formed but asks for something not allowed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Clients and tools (the fuzzer's link inference among them) address operations by id: one each.
    #[test]
    fn every_operation_has_its_own_id() {
        let doc = ApiDoc::openapi();
        let mut seen = std::collections::BTreeMap::new();
        for (path, item) in &doc.paths.paths {
            for op in [&item.get, &item.put, &item.post, &item.delete, &item.patch].into_iter().flatten() {
                let id = op.operation_id.clone().unwrap_or_default();
                assert!(!id.is_empty(), "{path} has an operation without an id");
                if let Some(other) = seen.insert(id.clone(), path.clone()) {
                    panic!("operation id `{id}` is used by both {other} and {path}");
                }
            }
        }
    }

    /// The OpenAPI document is generated from the code and kept in `docs/openapi.json`, so that every API
    /// change is a visible diff. After an intended change: `KERNELBOX_UPDATE_OPENAPI=1 cargo test openapi`.
    #[test]
    fn the_openapi_document_matches_its_snapshot() {
        let current = ApiDoc::openapi().to_pretty_json().expect("the document serializes") + "\n";
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/openapi.json");
        if std::env::var_os("KERNELBOX_UPDATE_OPENAPI").is_some() {
            std::fs::write(path, &current).expect("writing the snapshot");
        }
        let snapshot = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            snapshot == current,
            "the API changed: review it, then run `KERNELBOX_UPDATE_OPENAPI=1 cargo test openapi` to accept it"
        );
    }
}
