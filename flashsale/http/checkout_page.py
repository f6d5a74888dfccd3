"""The sandbox's local checkout page. Its buttons post webhooks that the server signed when it
rendered the page, so the browser sends exactly the gateway's webhook and never sees the key."""

import html

import msgspec

from flashsale.payments.provider import EventKind
from flashsale.payments.sandbox import SIGNATURE_HEADER, SandboxGateway

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Sandbox checkout</title>
<style>
 body {{ font-family: system-ui, sans-serif; max-width: 32rem; margin: 3rem auto; color: #222; }}
 .card {{ border: 1px solid #ddd; border-radius: 8px; padding: 1.5rem; }}
 button {{ font-size: 1rem; padding: .6rem 1.2rem; margin-right: .5rem; border-radius: 6px;
          border: 0; cursor: pointer; }}
 #pay {{ background: #1a7f37; color: white; }} #fail {{ background: #cf222e; color: white; }}
 .muted {{ color: #666; font-size: .9rem; }}
</style></head>
<body><div class="card">
<h1>Sandbox checkout</h1>
<p>Order <code>{order_id}</code></p>
<p>{quantity} &times; {unit_price} {currency} = <strong>{total} {currency}</strong></p>
<p class="muted">Hold expires {expires_at}. No money moves: this is the sandbox gateway.</p>
<button id="pay">Pay</button><button id="fail">Fail</button>
<p id="result" role="status"></p>
</div>
<script>
const webhooks = {webhooks};
async function send(which) {{
  document.querySelectorAll("button").forEach(b => b.disabled = true);
  const reply = await fetch("/webhooks/sandbox", {{method: "POST",
    headers: {{"Content-Type": "application/json", "{header}": webhooks[which].signature}},
    body: webhooks[which].body}});
  document.getElementById("result").textContent = reply.ok
    ? "Sent: the gateway reported the payment " + (which === "pay" ? "captured." : "failed.")
    : "The engine answered " + reply.status + "; try again.";
  if (reply.ok) setTimeout(() => location.reload(), 800);
}}
document.getElementById("pay").onclick = () => send("pay");
document.getElementById("fail").onclick = () => send("fail");
</script></body></html>
"""

_SETTLED = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Order {status}</title></head>
<body style="font-family: system-ui, sans-serif; max-width: 32rem; margin: 3rem auto">
<h1>Order {status}</h1><p>Order <code>{order_id}</code> is {status}; nothing to pay.</p>
</body></html>
"""


def _money(minor: int) -> str:
    return f"{minor // 100}.{minor % 100:02d}"


def settled_page(order_id: str, status: str) -> str:
    return _SETTLED.format(order_id=html.escape(order_id), status=html.escape(status))


def checkout_page(gateway: SandboxGateway, order_id: str, payment_id: str, quantity: int,
                  unit_price_minor: int, currency: str, expires_at: str) -> str:
    total = quantity * unit_price_minor
    webhooks = {}
    for which, kind in (("pay", EventKind.CAPTURED), ("fail", EventKind.FAILED)):
        body = gateway.event(kind, order_id, payment_id, total, currency)
        webhooks[which] = {"body": body.decode(), "signature": gateway.sign(body)}
    # Inside <script>: encode, then keep "</" from closing the element early.
    payload = msgspec.json.encode(webhooks).decode().replace("</", "<\\/")
    return _PAGE.format(order_id=html.escape(order_id), quantity=quantity,
                        unit_price=_money(unit_price_minor), total=_money(total),
                        currency=html.escape(currency), expires_at=html.escape(expires_at),
                        webhooks=payload, header=SIGNATURE_HEADER)
