// One visit to a WeChat mini-program instrumented with the real sa-sdk-miniprogram, driven
// through the wx shim: consent, app launch, page views, a custom event, the openid and
// unionid binds, a login, app hide. Reads its scenario as JSON (argv[2]) and prints what the
// SDK sent and the ids it generated as JSON on stdout.
"use strict";

const { install } = require("./wx.js");

const scenario = JSON.parse(process.argv[2]);
const runtime = install({ appid: scenario.appid });
const sensors = require("sa-sdk-miniprogram");

// Gives the SDK's own timers (set by init, track, app hide) a turn: it offers no completion
// callback to wait for. What the scenario needs is awaited by condition: drain() loops until
// the SDK's queue is empty, runtime.idle() until no request is in flight, and the Python
// side then polls the sink.
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

function postJson(url, auth, body) {
  return new Promise((resolve) => {
    wx.request({
      url,
      method: "POST",
      data: JSON.stringify(body),
      header: { "content-type": "application/json", authorization: "Basic " + Buffer.from(auth + ":").toString("base64") },
      success: (res) => resolve(res),
      fail: (err) => resolve({ statusCode: 0, data: err }),
    });
  });
}

async function drain() {
  // The SDK sends up to 100 events per request, one request at a time.
  for (let i = 0; i < 20 && sensors.store.mem.getLength() > 0; i++) {
    sensors.sendStrategy.batchSend();
    await sleep(20);
    await runtime.idle();
  }
}

// What the shop's backend does after wx.login (code2session gives it the openid and unionid)
// and after the shopper logs in: sign an identity assertion (HS256 JWT) binding the unionid
// and the user id to this install's anonymous id. The SDK sends it as a super property.
function base64url(value) {
  return Buffer.from(value).toString("base64").replace(/=+$/, "").replace(/\+/g, "-").replace(/\//g, "_");
}

function signAssertion(secret, claims) {
  const crypto = require("crypto");
  const head = base64url(JSON.stringify({ alg: "HS256", typ: "JWT" })) + "." + base64url(JSON.stringify(claims));
  const mac = crypto.createHmac("sha256", secret).update(head).digest();
  return head + "." + base64url(mac);
}

async function main() {
  sensors.setPara({
    name: "sensors",
    server_url: scenario.server_url,
    // Nothing leaves before app hide, so the consent below is recorded first.
    batch_send: { send_timeout: 600000, max_length: 1000 },
    autoTrack: { appLaunch: true, appShow: true, appHide: true, pageShow: true, pageShare: false, mpClick: false },
    show_log: false,
  });
  sensors.registerApp({ run_tag: scenario.tag });
  sensors.init();
  await sleep(20);
  runtime.showApp();

  const anonymousId = sensors.getAnonymousID();
  const out = { anonymous_id: anonymousId, consent: null };
  if (scenario.consent) {
    const identifiers = [];
    if (scenario.openid) identifiers.push({ type: "wechat_openid", id: scenario.openid, appid: scenario.appid });
    if (scenario.unionid) identifiers.push({ type: "wechat_unionid", id: scenario.unionid });
    const res = await postJson(scenario.consent.url, scenario.consent.write_key, {
      anonymousId,
      identifiers,
      grant: scenario.consent.grant,
      noticeId: scenario.consent.notice_id,
      sdk: "sa-sdk-miniprogram",
    });
    out.consent = res.statusCode;
  }

  if (scenario.assertion_secret && (scenario.unionid || scenario.login)) {
    const now = Math.floor(Date.now() / 1000);
    const claims = { aud: "idgate", iat: now, exp: now + 600, device: anonymousId };
    if (scenario.login) claims.sub = scenario.login;
    if (scenario.unionid) claims.ids = [{ type: "wechat_unionid", id: scenario.unionid }];
    sensors.registerApp({ $identity_assertion: signAssertion(scenario.assertion_secret, claims) });
  }

  for (const route of scenario.pages || []) runtime.openPage(route, { from: "test" });
  for (const ev of scenario.events || []) sensors.track(ev.name, ev.properties || {});
  if (scenario.openid) sensors.bindOpenid(scenario.openid);
  if (scenario.unionid) sensors.bindUnionid(scenario.unionid);
  if (scenario.login) sensors.login(scenario.login);
  if (scenario.profile) sensors.setProfile(scenario.profile);
  await sleep(20);
  runtime.hideApp();
  await sleep(20);
  await runtime.idle();
  await drain();

  out.identities = sensors.getIdentities();
  out.left_in_queue = sensors.store.mem.getLength();
  out.responses = runtime.responses.map((r) => ({ statusCode: r.statusCode, error: r.error, body: r.body }));
  process.stdout.write(JSON.stringify(out) + "\n");
  process.exit(0);
}

main().catch((err) => {
  process.stderr.write(String(err && err.stack ? err.stack : err) + "\n");
  process.exit(1);
});
