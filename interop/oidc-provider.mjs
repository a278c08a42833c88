// node-oidc-provider as a federated workload identity provider for scrip:
// client_credentials grant, RFC 9068 JWT access tokens (audience `scrip`).
// Every start generates a fresh signing key, so restarting it rotates keys.
// usage: node oidc-provider.mjs <port>
// Prints `ready <kid>` once listening.
import { randomUUID } from 'node:crypto';
import { generateKeyPair, exportJWK } from 'jose';
import Provider from 'oidc-provider';

const port = Number(process.argv[2]);
const issuer = `http://127.0.0.1:${port}`;
const { privateKey } = await generateKeyPair('ES256', { extractable: true });
const jwk = { ...(await exportJWK(privateKey)), kid: randomUUID(), alg: 'ES256', use: 'sig' };

const provider = new Provider(issuer, {
  clients: [{
    client_id: 'agent-1',
    client_secret: 'agent-1-secret',
    grant_types: ['client_credentials'],
    redirect_uris: [],
    response_types: [],
    token_endpoint_auth_method: 'client_secret_post',
    id_token_signed_response_alg: 'ES256',
  }],
  jwks: { keys: [jwk] },
  features: {
    devInteractions: { enabled: false },
    clientCredentials: { enabled: true },
    resourceIndicators: {
      enabled: true,
      defaultResource: () => 'urn:scrip',
      useGrantedResource: () => true,
      getResourceServerInfo: () => ({
        audience: 'scrip',
        scope: 'agent',
        accessTokenFormat: 'jwt',
        accessTokenTTL: 300,
        jwt: { sign: { alg: 'ES256' } },
      }),
    },
  },
});
provider.listen(port, '127.0.0.1', () => console.log(`ready ${jwk.kid}`));
