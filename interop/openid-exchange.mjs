// `openid-client` (v6) discovers scrip and performs RFC 8693 exchanges with
// client authentication `none`: a workload identity for a task token, then
// the task token for an access token at one tool.
// usage: node openid-exchange.mjs <issuer> <identity-jwt> <grants> <tool>
// Prints {"task": <response>, "access": <response>}; exits non-zero on error.
import * as client from 'openid-client';

const [issuer, identity, grants, tool] = process.argv.slice(2);
const TOKEN_EXCHANGE = 'urn:ietf:params:oauth:grant-type:token-exchange';
try {
  const config = await client.discovery(new URL(issuer), 'interop-agent', undefined, client.None(), {
    execute: [client.allowInsecureRequests], // scrip runs on http://127.0.0.1 in the test
    algorithm: 'oauth2', // RFC 8414 metadata, not OpenID Connect discovery
  });
  const meta = config.serverMetadata();
  if (meta.issuer !== issuer) throw new Error(`discovered issuer ${meta.issuer}`);
  const task = await client.genericGrantRequest(config, TOKEN_EXCHANGE, {
    subject_token: identity,
    subject_token_type: 'urn:ietf:params:oauth:token-type:jwt',
    requested_token_type: 'urn:ietf:params:oauth:token-type:txn_token',
    scope: grants,
    request_details: JSON.stringify({ purpose: 'interop with openid-client', environment: 'dev' }),
  });
  const access = await client.genericGrantRequest(config, TOKEN_EXCHANGE, {
    subject_token: task.access_token,
    subject_token_type: 'urn:ietf:params:oauth:token-type:txn_token',
    requested_token_type: 'urn:ietf:params:oauth:token-type:access_token',
    audience: tool,
  });
  console.log(JSON.stringify({ task, access }));
} catch (e) {
  console.error(`openid-client failed: ${e.code ?? ''} ${e.message} ${JSON.stringify(e.cause ?? '')}`);
  process.exit(1);
}
