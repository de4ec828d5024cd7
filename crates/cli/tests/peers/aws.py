"""AWS for the exchange tests: moto's server (from PyPI) with request
authentication on, so every S3 call's SigV4 signature and the assumed role's
policy are really checked.

moto does not verify web identity tokens; AWS does. So, in front of moto,
AssumeRoleWithWebIdentity is checked the way AWS checks it: the issuer's
keys are discovered from its /.well-known/openid-configuration over HTTPS
(PyJWT's JWKS client), the token's signature, issuer, audience and expiry
are verified, and the role's trust condition on `sub` is enforced; a token
that fails gets AWS's InvalidIdentityToken or AccessDenied answer. A token
that passes goes on to moto as the public (unsigned) call it is on AWS.

Usage: aws.py PORT ISSUER CA_FILE TRUSTED_SUB READY_FILE
Prints nothing; writes READY_FILE once set up. GET /_tether/counts returns
what it accepted and refused, so tests prove refusals at the destination.
"""

import io
import json
import ssl
import sys
import threading
import urllib.parse
import urllib.request

import boto3
import jwt
from moto import settings
from moto.core.authorization import ActionAuthenticatorMixin
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
from werkzeug.serving import make_server

port, issuer, ca, trusted_sub, ready = sys.argv[1:6]
ROLE = "arn:aws:iam::123456789012:role/reader"
BUCKET = "tether-reports"

ctx = ssl.create_default_context(cafile=ca)
with urllib.request.urlopen(issuer + "/.well-known/openid-configuration", context=ctx, timeout=10) as r:
    conf = json.load(r)
jwks = jwt.PyJWKClient(conf["jwks_uri"], ssl_context=ctx, cache_keys=False)

counts = {"sts_ok": 0, "sts_refused": 0, "s3_ok": 0, "s3_refused": 0}
lock = threading.Lock()
backend = DomainDispatcherApplication(create_backend_app)


def count(key):
    with lock:
        counts[key] += 1


def sts_error(start_response, code, message):
    body = (
        "<ErrorResponse><Error><Type>Sender</Type><Code>%s</Code><Message>%s</Message></Error></ErrorResponse>"
        % (code, message.replace("&", "&amp;").replace("<", "&lt;"))
    ).encode()
    start_response("400 Bad Request", [("Content-Type", "text/xml"), ("Content-Length", str(len(body)))])
    return [body]


def app(environ, start_response):
    if environ.get("PATH_INFO") == "/_tether/counts":
        with lock:
            body = json.dumps(counts).encode()
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]
    length = int(environ.get("CONTENT_LENGTH") or 0)
    raw = environ["wsgi.input"].read(length) if length else b""
    environ["wsgi.input"] = io.BytesIO(raw)
    form = urllib.parse.parse_qs(raw.decode("utf-8", "replace"))
    for k, v in urllib.parse.parse_qs(environ.get("QUERY_STRING", "")).items():
        form.setdefault(k, []).extend(v)
    if form.get("Action") == ["AssumeRoleWithWebIdentity"]:
        token = (form.get("WebIdentityToken") or [""])[0]
        try:
            key = jwks.get_signing_key_from_jwt(token)
            claims = jwt.decode(
                token, key, algorithms=["ES256", "ES384"], audience="sts.amazonaws.com", issuer=issuer
            )
        except Exception as e:
            count("sts_refused")
            return sts_error(start_response, "InvalidIdentityToken", "%s: %s" % (type(e).__name__, e))
        if claims.get("sub") != trusted_sub or form.get("RoleArn") != [ROLE]:
            count("sts_refused")
            return sts_error(start_response, "AccessDenied", "not authorized to perform sts:AssumeRoleWithWebIdentity")
        count("sts_ok")

    status = {}

    def record(s, headers, exc_info=None):
        status["code"] = int(s.split()[0])
        return start_response(s, headers, exc_info)

    out = backend(environ, record)
    if "AWS4-HMAC-SHA256" in environ.get("HTTP_AUTHORIZATION", "") and form.get("Action") is None:
        count("s3_ok" if status.get("code") == 200 else "s3_refused")
    return out


server = make_server("127.0.0.1", int(port), app, threaded=True)
threading.Thread(target=server.serve_forever, daemon=True).start()

# Set up with authentication still off, then switch it on for everything.
endpoint = "http://127.0.0.1:%s" % port
setup = dict(endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="setup", aws_secret_access_key="setup")
iam = boto3.client("iam", **setup)
iam.create_role(
    RoleName="reader",
    AssumeRolePolicyDocument=json.dumps(
        {
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Effect": "Allow",
                    "Principal": {"Federated": "arn:aws:iam::123456789012:oidc-provider/tether"},
                    "Action": "sts:AssumeRoleWithWebIdentity",
                }
            ],
        }
    ),
)
iam.put_role_policy(
    RoleName="reader",
    PolicyName="list-reports",
    PolicyDocument=json.dumps(
        {
            "Version": "2012-10-17",
            "Statement": [
                {"Effect": "Allow", "Action": ["s3:ListBucket"], "Resource": "arn:aws:s3:::%s" % BUCKET},
                # The injection test uploads (one part and multipart).
                {
                    "Effect": "Allow",
                    "Action": ["s3:PutObject", "s3:GetObject", "s3:AbortMultipartUpload"],
                    "Resource": "arn:aws:s3:::%s/*" % BUCKET,
                },
            ],
        }
    ),
)
s3 = boto3.client("s3", **setup)
s3.create_bucket(Bucket=BUCKET)
s3.put_object(Bucket=BUCKET, Key="q3.csv", Body=b"revenue,1\n")
# AssumeRoleWithWebIdentity is unsigned on AWS (the token authenticates it,
# verified above); every other call needs a valid signature.
signed_only = ActionAuthenticatorMixin._authenticate_and_authorize_normal_action


def web_identity_is_public(self, resource="*"):
    if self._get_action() == "AssumeRoleWithWebIdentity":
        return None
    return signed_only(self, resource)


ActionAuthenticatorMixin._authenticate_and_authorize_normal_action = web_identity_is_public
settings.INITIAL_NO_AUTH_ACTION_COUNT = 0
ActionAuthenticatorMixin.request_count = 0

with open(ready, "w") as f:
    f.write("ready")
threading.Event().wait()
