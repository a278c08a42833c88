// `openid-client` (v6) with its own DPoP (RFC 9449) implementation: it
// discovers scrip, starts a task, exchanges the task token for an access
// token bound to a fresh DPoP key, and calls a resource server with it.
// Then the same token without a proof, and with a proof by another key.
// usage: node openid-dpop.mjs <issuer> <identity-jwt> <grants> <tool> <resource-url>
// Prints {"access": <response>, "with_proof": <status>, "body": <text>,
//         "replayed_as_bearer": <status>, "other_key": <status>, "other_key_challenge": <text>}
import * as client from 'openid-client';

const [issuer, identity, grants, tool, resource] = process.argv.slice(2);
const TOKEN_EXCHANGE = 'urn:ietf:params:oauth:grant-type:token-exchange';
try {
  const config = await client.discovery(new URL(issuer), 'interop-agent', undefined, client.None(), {
    execute: [client.allowInsecureRequests],
    algorithm: 'oauth2',
  });
  const task = await client.genericGrantRequest(config, TOKEN_EXCHANGE, {
    subject_token: identity,
    subject_token_type: 'urn:ietf:params:oauth:token-type:jwt',
    requested_token_type: 'urn:ietf:params:oauth:token-type:txn_token',
    scope: grants,
    request_details: JSON.stringify({ purpose: 'interop with openid-client DPoP', environment: 'dev' }),
  });
  const dpop = client.getDPoPHandle(config, await client.randomDPoPKeyPair('ES256'));
  const access = await client.genericGrantRequest(
    config,
    TOKEN_EXCHANGE,
    {
      subject_token: task.access_token,
      subject_token_type: 'urn:ietf:params:oauth:token-type:txn_token',
      requested_token_type: 'urn:ietf:params:oauth:token-type:access_token',
      audience: tool,
    },
    { DPoP: dpop },
  );
  const res = await client.fetchProtectedResource(config, access.access_token, new URL(resource), 'GET', undefined, undefined, {
    DPoP: dpop,
  });
  const body = await res.text();
  const bearer = await fetch(resource, { headers: { authorization: `Bearer ${access.access_token}` } });
  const other = client.getDPoPHandle(config, await client.randomDPoPKeyPair('ES256'));
  let otherStatus = 0;
  let otherChallenge = '';
  try {
    const r = await client.fetchProtectedResource(config, access.access_token, new URL(resource), 'GET', undefined, undefined, {
      DPoP: other,
    });
    otherStatus = r.status;
    otherChallenge = r.headers.get('www-authenticate') ?? '';
  } catch (e) {
    // openid-client throws on a WWW-Authenticate challenge; it carries the response.
    otherStatus = e.response?.status ?? e.cause?.status ?? -1;
    otherChallenge = e.response?.headers?.get('www-authenticate') ?? String(e.message);
  }
  console.log(
    JSON.stringify({
      access,
      with_proof: res.status,
      body,
      replayed_as_bearer: bearer.status,
      other_key: otherStatus,
      other_key_challenge: otherChallenge,
    }),
  );
} catch (e) {
  console.error(`openid-client failed: ${e.code ?? ''} ${e.message} ${JSON.stringify(e.cause ?? '')}`);
  process.exit(1);
}
