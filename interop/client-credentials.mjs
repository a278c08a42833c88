// Gets a client_credentials access token from the oidc-provider.
// usage: node client-credentials.mjs <issuer>   (prints the token)
const [issuer] = process.argv.slice(2);
const res = await fetch(`${issuer}/token`, {
  method: 'POST',
  headers: { 'content-type': 'application/x-www-form-urlencoded' },
  body: new URLSearchParams({
    grant_type: 'client_credentials',
    client_id: 'agent-1',
    client_secret: 'agent-1-secret',
    scope: 'agent',
  }),
});
const body = await res.json();
if (!res.ok || !body.access_token) {
  console.error(`token request failed: ${res.status} ${JSON.stringify(body)}`);
  process.exit(1);
}
console.log(body.access_token);
