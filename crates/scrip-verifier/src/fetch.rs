//! Bounded HTTP requests for JSON documents: a size cap, no redirects (set
//! on the client), and errors that name the URL but never a credential.

/// Fetches `url` and returns its body, refusing more than `max` bytes and any
/// status but 200.
pub(crate) async fn get_bytes(
    http: &reqwest::Client,
    url: &str,
    bearer: Option<&str>,
    timeout: std::time::Duration,
    max: usize,
) -> Result<Vec<u8>, String> {
    let mut req = http
        .get(url)
        .timeout(timeout)
        .header(reqwest::header::ACCEPT, "application/json");
    if let Some(token) = bearer {
        req = req.bearer_auth(token);
    }
    answer(req, "GET", url, max).await
}

/// POSTs a form with a bearer token and reads a 200 answer of at most
/// `max` bytes.
pub(crate) async fn post_form_bytes(
    http: &reqwest::Client,
    url: &str,
    bearer: &str,
    form: &[(&str, &str)],
    timeout: std::time::Duration,
    max: usize,
) -> Result<Vec<u8>, String> {
    let body = url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(form.iter())
        .finish();
    let req = http
        .post(url)
        .timeout(timeout)
        .bearer_auth(bearer)
        .header(reqwest::header::ACCEPT, "application/json")
        .header(
            reqwest::header::CONTENT_TYPE,
            "application/x-www-form-urlencoded",
        )
        .body(body);
    answer(req, "POST", url, max).await
}

/// Sends `req` and reads its answer: status 200 and at most `max` bytes.
async fn answer(
    req: reqwest::RequestBuilder,
    method: &str,
    url: &str,
    max: usize,
) -> Result<Vec<u8>, String> {
    let mut response = req
        .send()
        .await
        .map_err(|e| format!("{method} `{url}` failed: {e}"))?;
    if response.status() != reqwest::StatusCode::OK {
        return Err(format!("{method} `{url}` answered {}", response.status()));
    }
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| format!("{method} `{url}` failed: {e}"))?
    {
        body.extend_from_slice(&chunk);
        if body.len() > max {
            return Err(format!("{method} `{url}` answered more than {max} bytes"));
        }
    }
    Ok(body)
}
