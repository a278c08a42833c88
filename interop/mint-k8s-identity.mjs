// A Kubernetes service-account token signed ES256 with a PKCS#8 PEM key, the
// claims as scrip-bench's `Idp::kubernetes` mints them, the key named by its
// RFC 7638 thumbprint (as `scrip-bench --print-jwks` names it). Used by
// scripts/wrk-crosscheck.sh.
//
//   node interop/mint-k8s-identity.mjs KEY.pem ISSUER NAMESPACE NAME
import { createPublicKey } from "node:crypto";
import { readFileSync } from "node:fs";
import { importPKCS8, calculateJwkThumbprint, SignJWT } from "jose";

const [keyFile, issuer, namespace, name] = process.argv.slice(2);
if (!name) {
  console.error("usage: mint-k8s-identity.mjs KEY.pem ISSUER NAMESPACE NAME");
  process.exit(2);
}
const pem = readFileSync(keyFile, "utf8");
const key = await importPKCS8(pem, "ES256");
// The thumbprint of the public half only: the private key is never exported.
const kid = await calculateJwkThumbprint(createPublicKey(pem).export({ format: "jwk" }));
const now = Math.floor(Date.now() / 1000);
process.stdout.write(
  await new SignJWT({
    "kubernetes.io": {
      namespace,
      serviceaccount: { name, uid: "4f1e6c52-0000-4000-8000-000000000001" },
      pod: { name: `${name}-7d9f8`, uid: "4f1e6c52-0000-4000-8000-000000000002" },
    },
  })
    .setProtectedHeader({ alg: "ES256", typ: "JWT", kid })
    .setIssuer(issuer)
    .setSubject(`system:serviceaccount:${namespace}:${name}`)
    .setAudience("scrip")
    .setIssuedAt(now)
    .setNotBefore(now)
    .setExpirationTime(now + 3600)
    .sign(key),
);
