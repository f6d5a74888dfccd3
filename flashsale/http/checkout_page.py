"""Checkout pages served by the engine: the sandbox's own, and Razorpay's (checkout.js).

The sandbox page's buttons post webhooks that the server signed when it rendered the page, so
the browser sends exactly the gateway's webhook and never sees the key."""

import html

import msgspec

from flashsale.money import major_units
from flashsale.payments.provider import EventKind, PaymentOrder, PaymentProvider
from flashsale.payments.razorpay_gateway import RazorpayGateway
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
  const buttons = document.querySelectorAll("button");
  const result = document.getElementById("result");
  buttons.forEach(b => b.disabled = true);
  let reply = null;
  try {{
    reply = await fetch("/webhooks/sandbox", {{method: "POST",
      headers: {{"Content-Type": "application/json", "{header}": webhooks[which].signature}},
      body: webhooks[which].body}});
  }} catch (error) {{}}  // the engine could not be reached: said below
  if (reply && reply.ok) {{
    result.textContent = "Sent: the gateway reported the payment "
      + (which === "pay" ? "captured." : "failed.");
    setTimeout(() => location.reload(), 800);
    return;
  }}
  result.textContent = (reply ? "The engine answered " + reply.status
                              : "The engine could not be reached") + "; try again.";
  buttons.forEach(b => b.disabled = false);
}}
document.getElementById("pay").onclick = () => send("pay");
document.getElementById("fail").onclick = () => send("fail");
</script></body></html>
"""

_RAZORPAY = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Checkout</title>
<script src="https://checkout.razorpay.com/v1/checkout.js"></script></head>
<body style="font-family: system-ui, sans-serif; max-width: 32rem; margin: 3rem auto">
<h1>Checkout</h1><p>Order <code>{order_id}</code>: <strong>{total} {currency}</strong></p>
<button id="pay">Pay with Razorpay</button>
<script>
const options = {options};
options.handler = () => {{ location.href = options.callback; }};
document.getElementById("pay").onclick = () => new Razorpay(options).open();
</script></body></html>
"""

_SETTLED = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Order {status}</title></head>
<body style="font-family: system-ui, sans-serif; max-width: 32rem; margin: 3rem auto">
<h1>Order {status}</h1><p>Order <code>{order_id}</code> is {status}; nothing to pay.</p>
</body></html>
"""


def settled_page(order_id: str, status: str) -> str:
    return _SETTLED.format(order_id=html.escape(order_id), status=html.escape(status))


def _script_json(value: object) -> str:
    # Inside <script>: encode, then keep "</" from closing the element early.
    return msgspec.json.encode(value).decode().replace("</", "<\\/")


def checkout_page(provider: PaymentProvider, order: PaymentOrder, session_id: str,
                  quantity: int, expires_at: str, return_url: str) -> str:
    """The page for a provider whose checkout the engine serves itself."""
    if isinstance(provider, RazorpayGateway):
        options = {"key": provider.key_id, "amount": order.amount_minor,
                   "currency": order.currency, "order_id": session_id, "name": "Flash sale",
                   "notes": {"order_id": order.order_id}, "callback": return_url}
        return _RAZORPAY.format(order_id=html.escape(order.order_id),
                                total=major_units(order.amount_minor, order.currency),
                                currency=html.escape(order.currency),
                                options=_script_json(options))
    assert isinstance(provider, SandboxGateway)
    webhooks = {}
    for which, kind in (("pay", EventKind.CAPTURED), ("fail", EventKind.FAILED)):
        body = provider.event(kind, order.order_id, session_id, order.amount_minor,
                              order.currency)
        webhooks[which] = {"body": body.decode(), "signature": provider.sign(body)}
    currency = order.currency
    return _PAGE.format(order_id=html.escape(order.order_id), quantity=quantity,
                        unit_price=major_units(order.amount_minor // quantity, currency),
                        total=major_units(order.amount_minor, currency),
                        currency=html.escape(currency),
                        expires_at=html.escape(expires_at), webhooks=_script_json(webhooks),
                        header=SIGNATURE_HEADER)
