// A small stand-in for the WeChat mini-program runtime, enough for the Sensors SDK:
// wx.request over real HTTP, storage in memory, system and account info stubbed, and
// App/Page/Component/getCurrentPages so the SDK's autotrack hooks have something to wrap.
"use strict";

const http = require("http");

function install({ appid, version = "1.0.0" }) {
  const storage = new Map();
  const appShow = [];
  const appHide = [];
  const pages = [];
  const pageDefs = {};
  let pending = 0;
  const idleWaiters = [];
  const responses = [];

  function settle() {
    pending -= 1;
    if (pending === 0) idleWaiters.splice(0).forEach((resolve) => resolve());
  }

  function request({ url, method = "GET", data, header = {}, dataType = "json", success, fail, complete }) {
    pending += 1;
    const body = method === "GET" || data === undefined ? undefined : typeof data === "string" ? data : JSON.stringify(data);
    const headers = {};
    for (const [k, v] of Object.entries(header)) headers[k.toLowerCase()] = v;
    if (body !== undefined) {
      headers["content-type"] = headers["content-type"] || "application/json";
      headers["content-length"] = Buffer.byteLength(body);
    }
    const req = http.request(url, { method, headers }, (res) => {
      const chunks = [];
      res.on("data", (c) => chunks.push(c));
      res.on("end", () => {
        const text = Buffer.concat(chunks).toString("utf8");
        let parsed = text;
        if (dataType === "json") {
          try {
            parsed = JSON.parse(text);
          } catch (e) {
            parsed = text;
          }
        }
        const result = { statusCode: res.statusCode, data: parsed, header: res.headers };
        responses.push({ url, method, statusCode: res.statusCode, body: text });
        // Like WeChat: success whenever the server answered, whatever the status.
        try {
          if (success) success(result);
          if (complete) complete(result);
        } finally {
          settle();
        }
      });
    });
    req.on("error", (err) => {
      responses.push({ url, method, error: String(err) });
      try {
        if (fail) fail({ errMsg: "request:fail " + err.message });
        if (complete) complete({ errMsg: "request:fail " + err.message });
      } finally {
        settle();
      }
    });
    if (body !== undefined) req.write(body);
    req.end();
    return { abort() {} };
  }

  const wx = {
    request,
    getStorageSync: (key) => (storage.has(key) ? JSON.parse(storage.get(key)) : ""),
    setStorageSync: (key, value) => storage.set(key, JSON.stringify(value)),
    getStorage: ({ key, success, fail, complete }) => {
      const result = storage.has(key) ? { data: JSON.parse(storage.get(key)) } : { errMsg: "getStorage:fail" };
      setImmediate(() => {
        if (storage.has(key) && success) success(result);
        if (!storage.has(key) && fail) fail(result);
        if (complete) complete(result);
      });
    },
    setStorage: ({ key, data, success }) => {
      storage.set(key, JSON.stringify(data));
      if (success) setImmediate(success);
    },
    removeStorageSync: (key) => storage.delete(key),
    getSystemInfo: ({ success, complete }) => {
      const info = {
        brand: "Apple",
        model: "iPhone 15",
        screenWidth: 393,
        screenHeight: 852,
        platform: "ios",
        system: "iOS 17.4",
        SDKVersion: "3.3.4",
        version: "8.0.47",
      };
      setImmediate(() => {
        if (success) success(info);
        if (complete) complete(info);
      });
    },
    getNetworkType: ({ success }) => setImmediate(() => success && success({ networkType: "wifi" })),
    onNetworkStatusChange: () => {},
    getAccountInfoSync: () => ({ miniProgram: { appId: appid, envVersion: "release", version } }),
    getLaunchOptionsSync: () => ({ path: "pages/index/index", scene: 1001, query: {} }),
    onAppShow: (cb) => appShow.push(cb),
    onAppHide: (cb) => appHide.push(cb),
    setNavigationBarTitle: () => {},
    login: ({ fail }) => fail && fail({ errMsg: "login:fail not in the shim" }),
  };

  globalThis.wx = wx;
  globalThis.App = (def) => def;
  globalThis.Page = (def) => {
    pageDefs.current = def;
  };
  globalThis.Component = () => {};
  globalThis.getCurrentPages = () => pages;

  return {
    // The runtime shows the app: the SDK's onAppShow listeners run (launch on the first).
    showApp(options = { path: "pages/index/index", scene: 1001, query: {} }) {
      appShow.forEach((cb) => cb(options));
    },
    hideApp() {
      appHide.forEach((cb) => cb());
    },
    // Define a page with Page() (the SDK wraps it) and show it, as the runtime would.
    openPage(route, query = {}) {
      globalThis.Page({ onLoad() {}, onShow() {} });
      const def = pageDefs.current;
      const instance = Object.assign(Object.create(def), { route, options: query });
      pages.push(instance);
      if (def.onLoad) def.onLoad.call(instance, query);
      if (def.onShow) def.onShow.call(instance);
    },
    idle() {
      return pending === 0 ? Promise.resolve() : new Promise((resolve) => idleWaiters.push(resolve));
    },
    responses,
    storage,
  };
}

module.exports = { install };
