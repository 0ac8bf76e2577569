// The page's session and its calls to the management API.
//
// The token comes in the URL's fragment (#token=…), which no browser sends to a server:
// it is moved into sessionStorage (this tab only) and taken out of the address bar at
// once. Each call sends it as Authorization: Bearer. Errors come back as
// application/problem+json and are thrown as ApiError, with the fields at fault.

const KEY = "webhook-gateway.settings.token";
const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;

/** What the fragment carried (the token is stored, not returned: whether there was
 * one), and the fragment removed from the address bar and the history. */
export function takeFragment() {
  const params = new URLSearchParams(location.hash.slice(1));
  const token = params.get("token");
  const endpoint = params.get("endpoint");
  const taken = token !== null && Boolean(token.trim());
  if (taken) sessionStorage.setItem(KEY, token.trim());
  if (token !== null || endpoint !== null) history.replaceState(null, "", location.pathname + location.search);
  return {token: taken, endpoint: endpoint && UUID.test(endpoint) ? endpoint : null};
}

export function token() {
  return sessionStorage.getItem(KEY);
}

export function remember(value) {
  sessionStorage.setItem(KEY, value.trim());
}

export function forget() {
  sessionStorage.removeItem(KEY);
}

/** The claims of a minted bot token (gwb1.<payload>.<signature>), read for display and
 * for the bot id a new endpoint is registered under; null for any other token. The
 * signature is the API's to check: nothing here is trusted beyond what to show. */
export function claims(value) {
  const parts = (value || "").split(".");
  if (parts.length !== 3 || parts[0] !== "gwb1") return null;
  try {
    const base64 = parts[1].replace(/-/g, "+").replace(/_/g, "/");
    const text = atob(base64 + "=".repeat((4 - (base64.length % 4)) % 4));
    const found = JSON.parse(text);
    if (typeof found !== "object" || found === null || typeof found.bot !== "string" || !UUID.test(found.bot)
        || !Number.isFinite(found.exp)) return null;
    return {bot: found.bot.toLowerCase(), expiresAt: new Date(found.exp * 1000)};
  } catch {
    return null;
  }
}

/** An answer other than 2xx: its status and problem (RFC 9457). */
export class ApiError extends Error {
  constructor(status, problem) {
    super(problem && typeof problem.detail === "string" ? problem.detail : `HTTP ${status}`);
    this.status = status;
    this.problem = problem || {};
    this.code = typeof this.problem.code === "string" ? this.problem.code : null;
  }

  /** Every input at fault: [{field, detail}]. */
  get fields() {
    return Array.isArray(this.problem.errors) ? this.problem.errors.filter((e) => e && typeof e.detail === "string")
      : [];
  }
}

let onSignedOut = () => {};

/** What to do when the API says the token is not (or no longer) good: 401. */
export function whenSignedOut(callback) {
  onSignedOut = callback;
}

/** A key for Idempotency-Key: the same one on a retry of the same action. */
export function newKey() {
  return crypto.randomUUID();
}

/** Call the API: ``method`` ``path`` with ``query`` parameters (empty ones left out),
 * a JSON ``body``, ``ifMatch`` (an ETag) and ``idempotencyKey``. Resolves to
 * {status, data, etag}; rejects with ApiError (or a TypeError when the API does not
 * answer at all). */
export async function call(method, path, {query = null, body = undefined, ifMatch = null, idempotencyKey = null,
  mergePatch = false} = {}) {
  const current = token();
  if (!current) {
    onSignedOut("no token");
    throw new ApiError(401, {detail: "no token: open this page from your settings", code: "unauthorized"});
  }
  const headers = {authorization: `Bearer ${current}`, accept: "application/json, application/problem+json"};
  if (body !== undefined) headers["content-type"] = mergePatch ? "application/merge-patch+json" : "application/json";
  if (ifMatch) headers["if-match"] = ifMatch;
  if (idempotencyKey) headers["idempotency-key"] = idempotencyKey;
  let url = path;
  if (query) {
    const params = new URLSearchParams();
    for (const [name, value] of Object.entries(query)) {
      if (value !== null && value !== undefined && value !== "") params.set(name, String(value));
    }
    const text = params.toString();
    if (text) url += `?${text}`;
  }
  const answer = await fetch(url, {
    method, headers, body: body === undefined ? undefined : JSON.stringify(body),
    cache: "no-store", credentials: "omit", redirect: "error", referrerPolicy: "no-referrer",
  });
  const etag = answer.headers.get("etag");
  let data = null;
  const type = answer.headers.get("content-type") || "";
  if (answer.status !== 204 && answer.status !== 304 && /json/.test(type)) {
    try {
      data = await answer.json();
    } catch {
      data = null;
    }
  }
  if (!answer.ok) {
    const error = new ApiError(answer.status, data);
    if (answer.status === 401) onSignedOut(error.message);
    throw error;
  }
  return {status: answer.status, data, etag};
}

/** An endpoint's ETag, from the version its JSON carries. */
export function etagOf(endpoint) {
  return `"${endpoint.version}"`;
}

/** A sentence for an error, as the page shows it. */
export function explain(error) {
  if (!(error instanceof ApiError)) {
    return "The API did not answer. Check your connection and try again.";
  }
  switch (error.status) {
    case 401:
      return "Your session has ended. Open this page again from your settings.";
    case 403:
      return `Not allowed with this page's token: ${error.message}`;
    case 404:
      return `Not found: ${error.message}`;
    case 412:
      return "Someone changed this endpoint since you loaded it (in another tab, or elsewhere). It has been "
        + "reloaded: check it, and make your change again.";
    case 429:
      return `Busy: ${error.message}. Try again in a moment.`;
    case 503:
    case 504:
      return `The gateway could not finish this now: ${error.message}`;
    default:
      return error.message;
  }
}
