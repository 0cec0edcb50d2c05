"""Verify a tollgate task callback (Standard Webhooks signing), with the standard library only.

    secret = "whsec_..."   # GET /admin/accounts/{id}/webhook-secret on the operator listener
    ok = verify(secret, request.headers, request.body)

The signed content is "<webhook-id>.<webhook-timestamp>.<raw body>"; the key is the base64
part of the secret after "whsec_"; `webhook-signature` holds one or more "v1,<base64>"
signatures separated by spaces. Reject old timestamps to stop replays. Run this file to check
the recipe against the specification's published example.
"""

import base64
import hashlib
import hmac
import time

TOLERANCE_SECONDS = 5 * 60


def verify(secret: str, headers: dict, body: bytes, now: float | None = None) -> bool:
    h = {k.lower(): v for k, v in headers.items()}
    msg_id, timestamp, signatures = h["webhook-id"], h["webhook-timestamp"], h["webhook-signature"]
    if abs((now or time.time()) - int(timestamp)) > TOLERANCE_SECONDS:
        return False
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = msg_id.encode() + b"." + timestamp.encode() + b"." + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    return any(
        hmac.compare_digest(sig.split(",", 1)[1], expected)
        for sig in signatures.split(" ")
        if sig.startswith("v1,")
    )


if __name__ == "__main__":
    example = {
        "webhook-id": "msg_p5jXN8AQM9LWM0D4loKWxJek",
        "webhook-timestamp": "1614265330",
        "webhook-signature": "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
    }
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    body = b'{"test": 2432232314}'
    assert verify(secret, example, body, now=1614265330)
    assert not verify(secret, example, body + b" ", now=1614265330)
    assert not verify(secret, example, body, now=1614265330 + 3600)
    print("the recipe verifies the specification's example")
