// A real OAuth2 authorization server for the exchange tests: node's
// oidc-provider (an OpenID-certified library), over HTTPS on loopback.
//
// One client, authenticated only by private_key_jwt against Tether's JWKS
// URL (discovered from Tether's /.well-known/openid-configuration): it may
// use client credentials and RFC 8693 token exchange. oidc-provider has no
// token exchange grant of its own, so one is registered here: the subject
// token must be a JWT-SVID from Tether's issuer whose audience is this token
// endpoint, verified against the same JWKS (jose, oidc-provider's own JOSE
// library); the answer is an access token of the library's own.
//
// Usage: node oauth.mjs PORT TETHER_ISSUER CERT KEY TTL_SECS CLIENT_ID READY
// (NODE_EXTRA_CA_CERTS must trust Tether's OIDC certificate.)
// GET /_tether/counts: grants issued and refused, and the sha256 of every
// access token issued, so a test can check a delivered file by hash.

import { createHash } from 'node:crypto';
import { readFileSync, writeFileSync } from 'node:fs';
import https from 'node:https';

import * as jose from 'jose';
import Provider, { errors } from 'oidc-provider';

const [port, tetherIssuer, certFile, keyFile, ttl, clientId, ready] = process.argv.slice(2);
const self = `https://127.0.0.1:${port}`;
const TOKEN_EXCHANGE = 'urn:ietf:params:oauth:grant-type:token-exchange';

const discovery = await (await fetch(`${tetherIssuer}/.well-known/openid-configuration`)).json();
const tetherKeys = jose.createRemoteJWKSet(new URL(discovery.jwks_uri), { cacheMaxAge: 0, cooldownDuration: 0 });

const counts = { grant_ok: 0, grant_refused: 0, refusals: [], issued: [] };
const sha256 = (v) => createHash('sha256').update(v).digest('hex');

const provider = new Provider(self, {
  clients: [{
    client_id: clientId,
    token_endpoint_auth_method: 'private_key_jwt',
    jwks_uri: discovery.jwks_uri,
    grant_types: ['client_credentials', TOKEN_EXCHANGE],
    redirect_uris: [],
    response_types: [],
    scope: 'reports:read',
  }],
  clientAuthMethods: ['private_key_jwt'],
  enabledJWA: { clientAuthSigningAlgValues: ['ES256', 'ES384'] },
  features: {
    clientCredentials: { enabled: true },
    devInteractions: { enabled: false },
  },
  // The library refuses to fetch a client's jwks_uri from special-use
  // addresses (SSRF protection); here Tether's issuer is on loopback by design.
  fetch: (url, options) => globalThis.fetch(url, { ...options, dispatcher: undefined }),
  scopes: ['reports:read'],
  ttl: { ClientCredentials: Number(ttl) },
});

provider.registerGrantType(TOKEN_EXCHANGE, async (ctx) => {
  const { subject_token: subject, subject_token_type: type, scope } = ctx.oidc.params;
  if (type !== 'urn:ietf:params:oauth:token-type:jwt') {
    throw new errors.InvalidRequest('subject_token_type must be urn:ietf:params:oauth:token-type:jwt');
  }
  let claims;
  try {
    ({ payload: claims } = await jose.jwtVerify(subject, tetherKeys, {
      issuer: tetherIssuer,
      audience: `${self}/token`,
      algorithms: ['ES256', 'ES384'],
    }));
  } catch (e) {
    throw new errors.InvalidGrant(`subject_token: ${e.message}`);
  }
  const token = new provider.ClientCredentials({ client: ctx.oidc.client, scope: scope || undefined });
  token.extra = { sub: claims.sub };
  const value = await token.save();
  ctx.body = {
    access_token: value,
    issued_token_type: 'urn:ietf:params:oauth:token-type:access_token',
    token_type: 'Bearer',
    expires_in: token.expiration,
  };
}, ['subject_token', 'subject_token_type', 'audience', 'scope', 'requested_token_type', 'resource']);

provider.on('client_credentials.saved', (token) => counts.issued.push(sha256(token.jti)));
provider.on('grant.success', () => { counts.grant_ok += 1; });
provider.on('grant.error', (ctx, err) => {
  counts.grant_refused += 1;
  const causes = [];
  for (let c = err.cause; c && causes.length < 4; c = c.cause) causes.push(c.message);
  counts.refusals.push([`${err.error}: ${err.error_description}`, err.error_detail, ...causes].filter(Boolean).join('; '));
});

const app = provider.callback();
https.createServer({ cert: readFileSync(certFile), key: readFileSync(keyFile) }, (req, res) => {
  if (req.url === '/_tether/counts') {
    res.setHeader('content-type', 'application/json');
    res.end(JSON.stringify(counts));
    return;
  }
  app(req, res);
}).listen(Number(port), '127.0.0.1', () => writeFileSync(ready, 'ready'));
