// `openid-client` (v6) delegates a DPoP-bound task to a sub-agent whose key
// it names by the RFC 7638 thumbprint `jose` computes (scrip's `dpop_jkt`).
// The task is started bound to key A (openid-client's DPoP on the start);
// a delegation without `dpop_jkt` is refused, one naming key B gives a
// sub-task bound to B. The sub-agent exchanges the sub-task's token with
// B's proofs; A's proofs are refused.
// usage: node openid-dpop-delegate.mjs <issuer> <identity-jwt> <actor-jwt> <grants> <tool>
// Prints {"jkt": <B's thumbprint>, "child": <the sub-task's answer>,
//         "access": <the sub-agent's access-token answer>,
//         "unnamed": <"error: description" of the delegation without dpop_jkt>,
//         "parent_key": <"error: description" of the sub-task's exchange with A>}
import * as client from 'openid-client';
import * as jose from 'jose';

const [issuer, identity, actor, grants, tool] = process.argv.slice(2);
const TOKEN_EXCHANGE = 'urn:ietf:params:oauth:grant-type:token-exchange';
const TXN = 'urn:ietf:params:oauth:token-type:txn_token';
const JWT = 'urn:ietf:params:oauth:token-type:jwt';

// The OAuth error code and description of a refused request, or '' when
// it was not refused.
async function refusal(request) {
  try {
    await request;
    return '';
  } catch (e) {
    return `${e.error ?? e.code ?? ''}: ${e.error_description ?? e.message}`;
  }
}

try {
  const config = await client.discovery(new URL(issuer), 'interop-agent', undefined, client.None(), {
    execute: [client.allowInsecureRequests],
    algorithm: 'oauth2',
  });
  const parentKey = client.getDPoPHandle(config, await client.randomDPoPKeyPair('ES256'));
  const subAgentPair = await client.randomDPoPKeyPair('ES256');
  const subAgentKey = client.getDPoPHandle(config, subAgentPair);
  const jkt = await jose.calculateJwkThumbprint(await jose.exportJWK(subAgentPair.publicKey), 'sha256');
  const task = await client.genericGrantRequest(
    config,
    TOKEN_EXCHANGE,
    {
      subject_token: identity,
      subject_token_type: JWT,
      requested_token_type: TXN,
      scope: grants,
      request_details: JSON.stringify({ purpose: 'interop: a bound delegation', environment: 'dev' }),
    },
    { DPoP: parentKey },
  );
  const delegation = (details) => ({
    subject_token: task.access_token,
    subject_token_type: TXN,
    actor_token: actor,
    actor_token_type: JWT,
    requested_token_type: TXN,
    scope: grants,
    ...(details ? { request_details: JSON.stringify(details) } : {}),
  });
  const unnamed = await refusal(
    client.genericGrantRequest(config, TOKEN_EXCHANGE, delegation(null), { DPoP: parentKey }),
  );
  const child = await client.genericGrantRequest(config, TOKEN_EXCHANGE, delegation({ dpop_jkt: jkt }), {
    DPoP: parentKey,
  });
  const exchange = {
    subject_token: child.access_token,
    subject_token_type: TXN,
    requested_token_type: 'urn:ietf:params:oauth:token-type:access_token',
    audience: tool,
  };
  const parent_key = await refusal(
    client.genericGrantRequest(config, TOKEN_EXCHANGE, exchange, { DPoP: parentKey }),
  );
  const access = await client.genericGrantRequest(config, TOKEN_EXCHANGE, exchange, { DPoP: subAgentKey });
  console.log(JSON.stringify({ jkt, child, access, unnamed, parent_key }));
} catch (e) {
  console.error(`openid-client failed: ${e.code ?? ''} ${e.error ?? ''} ${e.message} ${JSON.stringify(e.cause ?? '')}`);
  process.exit(1);
}
