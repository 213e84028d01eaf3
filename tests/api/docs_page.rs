//! The interactive docs as a browser, `curl` or a link checker fetch them: `/docs` and `/docs/` answer 200
//! themselves (no redirect followed), with no key on a server that has keys, and every asset each page
//! names loads from where that page's own URL resolves it, the OpenAPI document included.

use crate::helpers::*;

/// The values of `name="..."` attributes in `html`, in order.
fn attributes(html: &str, name: &str) -> Vec<String> {
    let needle = format!(" {name}=\"");
    html.match_indices(&needle)
        .filter_map(|(at, _)| html[at + needle.len()..].split('"').next().map(str::to_owned))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn docs_answer_200_at_both_urls_and_their_assets_load_from_each() {
    let app =
        spawn_app_with(AppOptions { api_keys: vec!["docs-key".into()], images: false, ..Default::default() }).await;
    let browser = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    for page in ["/docs", "/docs/"] {
        let page_url = reqwest::Url::parse(&app.url(page)).unwrap();
        let r = browser.get(page_url.clone()).send().await.unwrap();
        assert_eq!(r.status(), 200, "{page}: the page itself, not a redirect");
        assert!(r.headers()["content-type"].to_str().unwrap().starts_with("text/html"), "{page}");
        let html = r.text().await.unwrap();
        // As a browser does: relative URLs resolve against <base href> when the page has one, else the page.
        let base_tag = html.find("<base ").map(|at| attributes(&html[at - 1..], "href").remove(0));
        let base = match &base_tag {
            Some(href) => page_url.join(href).unwrap(),
            None => page_url.clone(),
        };
        let mut assets: Vec<String> = attributes(&html, "src");
        assets.extend(attributes(&html, "href").into_iter().filter(|h| Some(h) != base_tag.as_ref()));
        assert!(assets.len() >= 5, "{page}: {assets:?}");
        let mut initializer = None;
        for asset in &assets {
            let url = base.join(asset).unwrap();
            assert!(url.path().starts_with("/docs/"), "{page}: {asset} resolves to {url}, outside the docs");
            let r = browser.get(url.clone()).send().await.unwrap();
            assert_eq!(r.status(), 200, "{page}: {asset} ({url})");
            let body = r.bytes().await.unwrap();
            assert!(!body.is_empty(), "{page}: {asset}");
            if asset.ends_with("swagger-initializer.js") {
                initializer = Some(String::from_utf8_lossy(&body).into_owned());
            }
        }
        // The document the page asks for, where the page resolves it.
        let initializer = initializer.unwrap_or_else(|| panic!("{page} loads swagger-initializer.js: {assets:?}"));
        let document = initializer.split("\"url\": \"").nth(1).and_then(|s| s.split('"').next()).unwrap();
        let r = browser.get(base.join(document).unwrap()).send().await.unwrap();
        assert_eq!(r.status(), 200, "{page}: {document}");
        let spec: serde_json::Value = r.json().await.unwrap();
        assert!(spec["paths"]["/v1/sessions"].is_object(), "{page}: the OpenAPI document");
    }
}
