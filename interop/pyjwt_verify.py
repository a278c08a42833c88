"""PyJWT verifies a scrip access token with PyJWKClient.

usage: python pyjwt_verify.py <issuer> <audience> <token>
Prints the verified claims as JSON; exits non-zero when PyJWT refuses it.
"""
import json
import sys
import urllib.request

import jwt

issuer, audience, token = sys.argv[1:4]
with urllib.request.urlopen(f"{issuer}/.well-known/oauth-authorization-server") as r:
    meta = json.load(r)
try:
    # PyJWT does not check `typ`; RFC 9068 §4 requires it.
    typ = jwt.get_unverified_header(token).get("typ", "")
    if typ.lower().removeprefix("application/") != "at+jwt":
        raise jwt.InvalidTokenError(f"typ is {typ!r}, not at+jwt")
    key = jwt.PyJWKClient(meta["jwks_uri"]).get_signing_key_from_jwt(token)
    claims = jwt.decode(
        token,
        key.key,
        algorithms=["ES256", "EdDSA", "RS256"],
        audience=audience,
        issuer=issuer,
        options={"require": ["iss", "sub", "aud", "exp", "iat", "jti"], "strict_aud": True},
    )
except jwt.PyJWTError as e:
    print(f"PyJWT refused the token: {type(e).__name__}: {e}", file=sys.stderr)
    sys.exit(1)
print(json.dumps(claims))
