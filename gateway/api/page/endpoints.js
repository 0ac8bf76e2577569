// The bot's endpoints: the list, a new one (its secret shown once), and one endpoint's
// view: its settings (a merge patch of what changed, with If-Match), enable and disable,
// delete, rotating its secret, test sends, its circuit and stats.

import {ApiError, call, etagOf, explain, newKey} from "./api.js";
import {$, cell, checked, facts, fill, h, longText, ms, percent, setChecked, show, time} from "./dom.js";
import {refreshEndpointChoices} from "./deadletters.js";
import {loadHistory, resetHistory} from "./history.js";
import {announce, clearFieldErrors, clearProblem, masked, problem, running, secretOnce, showError,
  state} from "./ui.js";

const path = (id, suffix = "") => `/v1/endpoints/${encodeURIComponent(id)}${suffix}`;

export async function loadEndpoints() {
  const all = [];
  let cursor = null;
  for (let page = 0; page < 20; page += 1) {
    const {data} = await call("GET", "/v1/endpoints", {query: {limit: 100, cursor}});
    all.push(...data.data);
    cursor = data.nextCursor;
    if (!cursor) break;
  }
  state.endpoints = new Map(all.map((endpoint) => [endpoint.id, endpoint]));
  renderList();
}

function remember(endpoint) {
  state.endpoints.set(endpoint.id, masked(endpoint));
  renderList();
  return state.endpoints.get(endpoint.id);
}

function eventsText(endpoint) {
  return endpoint.events.length ? endpoint.events.join(", ") : "every event type";
}

function badge(endpoint) {
  return endpoint.enabled ? h("span", {class: "badge on"}, "Enabled") : h("span", {class: "badge off"}, "Disabled");
}

function limits(endpoint) {
  const parts = [];
  if (endpoint.rateLimit !== null && endpoint.rateLimit !== undefined) parts.push(`at most ${endpoint.rateLimit}/s`);
  if (endpoint.maxInFlight !== null && endpoint.maxInFlight !== undefined) {
    parts.push(`${endpoint.maxInFlight} in flight`);
  }
  return parts;
}

function renderList() {
  const endpoints = [...state.endpoints.values()];
  fill($("endpoint-list"), endpoints.map((endpoint) => {
    const urlId = `card-url-${endpoint.id}`;
    return h("li", {class: "card", dataset: {endpointId: endpoint.id}},
      h("p", {class: "url", id: urlId}, endpoint.url),
      endpoint.description ? h("div", {class: "description"}, longText(endpoint.description, 160)) : null,
      h("p", {class: "meta"}, badge(endpoint), " ", eventsText(endpoint),
        limits(endpoint).map((text) => ` · ${text}`), " · created ", time(endpoint.createdAt)),
      h("button", {type: "button", class: "secondary", "aria-describedby": urlId,
        onclick: () => openEndpoint(endpoint.id)}, "Manage"));
  }));
  show($("endpoints-empty"), endpoints.length === 0);
  refreshEndpointChoices();
}

// --- a new endpoint ---------------------------------------------------------------------

function number(field) {
  return field.value.trim() === "" ? null : Number(field.value);
}

/** The same Idempotency-Key for the same body: a retry after a lost answer (or a 504)
 * gets the first answer; a changed form is a new request. */
function keyFor(form, body) {
  const text = JSON.stringify(body);
  if (form.pending && form.pending.body === text) return form.pending.key;
  form.pending = {body: text, key: newKey()};
  return form.pending.key;
}

async function create(event) {
  event.preventDefault();
  const form = event.currentTarget;
  clearFieldErrors(form);
  clearProblem();
  const body = {botId: state.bot, url: form.elements.url.value.trim(), events: checked(form, "events")};
  if (form.elements.description.value.trim()) body.description = form.elements.description.value;
  if (form.elements.secret.value.trim()) body.secret = form.elements.secret.value.trim();
  if (number(form.elements.rateLimit) !== null) body.rateLimit = number(form.elements.rateLimit);
  if (number(form.elements.maxInFlight) !== null) body.maxInFlight = number(form.elements.maxInFlight);
  const button = form.querySelector("button[type=submit]");
  await running(button, async () => {
    const {data} = await call("POST", "/v1/endpoints", {body, idempotencyKey: keyFor(form, body)});
    form.pending = null;
    form.reset();
    remember(data);
    const lines = [h("p", {}, "Your endpoint ", h("code", {}, data.url), " receives ", eventsText(data), ".")];
    if (data.warning) lines.push(h("p", {class: "notice"}, "Deliveries to it would be refused: ", data.warning));
    lines.push(h("p", {}, "Give this secret to your receiver: it verifies each webhook's signature with it. The "
      + "page cannot show it again."));
    announce(`Endpoint created: ${data.url}. Copy its signing secret now: it is shown this once.`);
    secretOnce($("create-result"), "Endpoint created", lines, data.secret);
  }, (error) => showError(form, "create", error));
}

// --- one endpoint -------------------------------------------------------------------------

function current() {
  return state.current === null ? null : state.endpoints.get(state.current);
}

export async function openEndpoint(id) {
  clearProblem();
  let data;
  try {
    ({data} = await call("GET", path(id)));
  } catch (error) {
    if (error instanceof ApiError && error.status === 403) {
      problem(`That endpoint is not one of this bot's: this page's token cannot see it. (${error.message})`);
    } else if (!(error instanceof ApiError && error.status === 401)) {
      problem(error);
    }
    return;
  }
  state.current = data.id;
  const endpoint = remember(data);
  renderEndpoint(endpoint);
  fillSettings(endpoint);
  for (const id of ["test-result", "rotate-result", "health-body"]) $(id).replaceChildren();
  hideDeleteConfirm();
  show($("endpoints"), false);
  show($("endpoint-view"), true);
  $("endpoint-h").focus();
  resetHistory(endpoint);
  await Promise.all([loadHealth(), loadHistory()]);
}

export function closeEndpoint({focus = true} = {}) {
  state.current = null;
  show($("endpoint-view"), false);
  show($("endpoints"), true);
  if (focus) $("endpoints-h").focus();
}

function renderEndpoint(endpoint) {
  $("ep-url").textContent = endpoint.url;
  fill($("ep-description"), endpoint.description ? longText(endpoint.description)
    : h("span", {class: "hint"}, "No description."));
  const limit = endpoint.rateLimit === null || endpoint.rateLimit === undefined ? "none"
    : `${endpoint.rateLimit} requests per second`;
  const inFlight = endpoint.maxInFlight === null || endpoint.maxInFlight === undefined ? "the gateway's default"
    : String(endpoint.maxInFlight);
  fill($("ep-facts"), facts([
    ["State", badge(endpoint)],
    ["Event types", eventsText(endpoint)],
    ["Rate limit", limit],
    ["Max in flight", inFlight],
    ["Signing secret", h("code", {}, endpoint.secret)],
    ["Created", time(endpoint.createdAt)],
    ["Changed", time(endpoint.updatedAt)],
    ["Id", h("code", {}, endpoint.id)],
  ]));
  $("ep-toggle").textContent = endpoint.enabled ? "Disable" : "Enable";
  fill($("secret-state"), endpoint.previousSecretExpiresAt
    ? ["Two secrets sign each webhook: the current one, and the previous one until ",
      time(endpoint.previousSecretExpiresAt), "."]
    : "One secret signs each webhook. It was shown once, when it was made; rotate it to get a new one.");
}

// What the API accepts now: a longer value (written to the topic by something else) is
// not put into a field, where it would only be refused on saving (and a field of tens
// of kilobytes is slow to lay out); the field says so instead.
const MAX_URL = 2048;
const MAX_DESCRIPTION = 1000;
let shownInForm = {url: "", description: ""};

function fillField(form, name, value, max) {
  const field = form.elements[name];
  const fits = value.length <= max;
  field.value = fits ? value : "";
  const message = document.getElementById(`${field.id}-error`);
  if (!fits) {
    message.textContent = `The current value is ${value.length.toLocaleString("en")} characters: more than the `
      + `${max.toLocaleString("en")} allowed now. Leave the field empty to keep it, or write a new one.`;
    message.hidden = false;
  }
  return field.value;
}

function fillSettings(endpoint) {
  const form = $("edit-form");
  clearFieldErrors(form);
  shownInForm = {
    url: fillField(form, "url", endpoint.url, MAX_URL),
    description: fillField(form, "description", endpoint.description ?? "", MAX_DESCRIPTION),
  };
  setChecked(form, "events", endpoint.events);
  form.elements.rateLimit.value = endpoint.rateLimit ?? "";
  form.elements.maxInFlight.value = endpoint.maxInFlight ?? "";
}

async function reloadCurrent() {
  const endpoint = current();
  if (endpoint === null) return;
  const {data} = await call("GET", path(endpoint.id));
  const fresh = remember(data);
  renderEndpoint(fresh);
  fillSettings(fresh);
}

/** A versioned write to the open endpoint: If-Match with the version it was shown at.
 * On 412 (changed since) the endpoint is read again and shown; on 404 it is gone. */
async function change(method, suffix, options = {}) {
  const endpoint = current();
  try {
    return await call(method, path(endpoint.id, suffix), {...options, ifMatch: etagOf(endpoint)});
  } catch (error) {
    if (error instanceof ApiError && error.status === 412) {
      await reloadCurrent();
      problem(explain(error));
      return null;
    }
    if (error instanceof ApiError && error.status === 404) {
      state.endpoints.delete(endpoint.id);
      renderList();
      closeEndpoint();
      problem("That endpoint no longer exists: it was removed elsewhere.");
      return null;
    }
    throw error;
  }
}

function sameSet(a, b) {
  return a.length === b.length && a.every((item) => b.includes(item));
}

async function save(event) {
  event.preventDefault();
  const form = event.currentTarget;
  const endpoint = current();
  clearFieldErrors(form);
  clearProblem();
  // A merge patch of what changed only: a field left alone is not sent (and so cannot
  // undo a change made meanwhile to it).
  const patch = {};
  const url = form.elements.url.value.trim();
  if (url !== shownInForm.url && url !== "") patch.url = url;
  const description = form.elements.description.value;
  if (description !== shownInForm.description) patch.description = description.trim() ? description : null;
  const events = checked(form, "events");
  if (!sameSet(events, endpoint.events)) patch.events = events.length ? events : null;
  const rate = number(form.elements.rateLimit);
  if (rate !== (endpoint.rateLimit ?? null)) patch.rateLimit = rate;
  const inFlight = number(form.elements.maxInFlight);
  if (inFlight !== (endpoint.maxInFlight ?? null)) patch.maxInFlight = inFlight;
  if (Object.keys(patch).length === 0) {
    announce("Nothing to save: the settings are as they were.");
    return;
  }
  await running(form.querySelector("button[type=submit]"), async () => {
    const answer = await change("PATCH", "", {body: patch, mergePatch: true});
    if (answer === null) return;
    const saved = remember(answer.data);
    renderEndpoint(saved);
    fillSettings(saved);
    announce(answer.data.warning ? `Saved. Note: deliveries to it would be refused: ${answer.data.warning}`
      : `Saved: ${Object.keys(patch).join(", ")} changed.`);
  }, (error) => showError(form, "edit", error));
}

async function toggle() {
  const endpoint = current();
  const action = endpoint.enabled ? "disable" : "enable";
  await running($("ep-toggle"), async () => {
    const answer = await change("POST", `/${action}`);
    if (answer === null) return;
    const saved = remember(answer.data);
    renderEndpoint(saved);
    announce(saved.enabled ? "Enabled: the endpoint receives events again."
      : "Disabled: the endpoint receives no events; deliveries waiting for a retry become dead letters "
        + "(endpoint_disabled), which you can replay once it is enabled again.");
  });
}

function hideDeleteConfirm() {
  show($("ep-delete-confirm"), false);
  $("ep-delete").setAttribute("aria-expanded", "false");
}

async function remove() {
  const endpoint = current();
  await running($("ep-delete-yes"), async () => {
    const answer = await change("DELETE", "");
    if (answer === null) return;
    state.endpoints.delete(endpoint.id);
    renderList();
    closeEndpoint();
    announce(`Endpoint deleted: ${endpoint.url}`);
  });
}

async function rotate(event) {
  event.preventDefault();
  const form = event.currentTarget;
  const grace = Number(form.elements.graceSeconds.value);
  await running(form.querySelector("button[type=submit]"), async () => {
    const answer = await change("POST", "/rotate-secret", {body: {graceSeconds: grace}});
    if (answer === null) return;
    const data = answer.data;
    const saved = remember(data);
    renderEndpoint(saved);
    const until = data.previousSecretExpiresAt;
    const lines = [until
      ? h("p", {class: "grace"}, "The old secret keeps signing too until ", time(until),
        ": update your receiver with the new one before then.")
      : h("p", {class: "grace"}, "The old secret no longer signs: update your receiver now.")];
    announce("Secret rotated. Copy the new one now: it is shown this once.");
    secretOnce($("rotate-result"), "New signing secret", lines, data.secret);
  });
}

// --- test sends -------------------------------------------------------------------------

const KINDS = {example: "Example", bad_signature: "Bad signature", stale_timestamp: "Stale timestamp"};
const VERDICTS = {
  delivered: "delivered (2xx)", failed: "failed (not 2xx)", rejected: "refused, as it should be",
  accepted: "accepted: your endpoint does not verify signatures", "no answer": "no answer",
};

async function sendTests(event) {
  event.preventDefault();
  const form = event.currentTarget;
  const endpoint = current();
  const events = checked(form, "events");
  if (events.length === 0) {
    problem("Choose at least one event type to send.");
    return;
  }
  const body = {events, malformed: form.elements.malformed.checked};
  const result = $("test-result");
  fill(result, h("p", {}, "Sending…"));
  await running(form.querySelector("button[type=submit]"), async () => {
    const {data} = await call("POST", path(endpoint.id, "/test"), {body, idempotencyKey: newKey()});
    const rows = data.results.map((probe) => h("tr", {class: probe.ok ? "ok" : "bad"},
      cell("Request", KINDS[probe.kind] ?? probe.kind),
      cell("Event", h("code", {}, probe.eventType)),
      cell("Result", h("span", {class: probe.ok ? "verdict-ok" : "verdict-bad"}, probe.ok ? "✓ " : "✗ ",
        VERDICTS[probe.verdict] ?? probe.verdict)),
      cell("Status", probe.status === null ? probe.outcome : String(probe.status)),
      cell("Took", ms(probe.durationMs)),
      cell("Answer", probe.error ? h("p", {}, probe.error) : null,
        probe.response ? h("pre", {class: "snippet"}, probe.response) : null)));
    const summary = data.ok
      ? "Every example was accepted and every malformed request refused."
      : "Not every request went as it should: see the marked rows.";
    fill(result,
      h("p", {class: data.ok ? "verdict-ok" : "verdict-bad"}, summary),
      h("div", {class: "table-wrap"}, h("table", {class: "rows", id: "test-table"},
        h("caption", {class: "vh"}, "Test requests and how your endpoint answered"),
        h("thead", {}, h("tr", {}, ["Request", "Event", "Result", "Status", "Took", "Answer"].map(
          (name) => h("th", {scope: "col"}, name)))),
        h("tbody", {}, rows))),
      h("p", {class: "hint"}, "Test sends are not deliveries: they are never retried, dead-lettered or kept in "
        + "the history."));
    announce(`Test sent: ${summary}`);
  }, (error) => {
    result.replaceChildren();
    problem(error);
  });
}

// --- circuit and stats ----------------------------------------------------------------------

function circuitWords(circuit) {
  switch (circuit.state) {
    case "closed":
      return [h("span", {class: "badge ok"}, "Circuit closed"), " Deliveries are attempted as they come."];
    case "open":
      return [h("span", {class: "badge bad"}, "Circuit open"), " Since ", time(circuit.since), `, after `
        + `${circuit.failures} failures in a row: attempts are recorded as circuit_open without a request, on the `
        + "usual retry schedule, until a probe", circuit.probeAt ? [" (", time(circuit.probeAt), ")"] : "",
        " succeeds. A delivery's last attempt always makes a real request."];
    case "half_open":
      return [h("span", {class: "badge warn"}, "Circuit half-open"), " A probe request is testing the endpoint."];
    default:
      return [h("span", {class: "badge"}, "Circuit unknown"), " No worker has reported it yet."];
  }
}

async function loadHealth() {
  const endpoint = current();
  if (endpoint === null) return;
  const body = $("health-body");
  try {
    const {data} = await call("GET", path(endpoint.id, "/stats"));
    const rows = data.windows.map((window) => h("tr", {},
      cell("Window", `last ${window.window}`, window.complete ? "" : " (partly: older attempts dropped)"),
      cell("Attempts", String(window.attempts)),
      cell("Succeeded", String(window.succeeded)),
      cell("Failed", String(window.failed)),
      cell("Deferred", String(window.deferred)),
      cell("Success rate", percent(window.successRate))));
    const deferred = data.windows.find((w) => w.deferred > 0);
    const failure = data.lastFailure;
    fill(body,
      h("p", {id: "circuit"}, circuitWords(data.circuit)),
      deferred ? h("p", {class: "notice"}, `${deferred.deferred} deliveries were deferred in the last `
        + `${deferred.window}: your endpoint is slower than your traffic (or its limits are lower). Events are `
        + "waiting, none are lost.") : null,
      h("div", {class: "table-wrap"}, h("table", {class: "rows", id: "stats-table"},
        h("caption", {class: "vh"}, "Attempts by window"),
        h("thead", {}, h("tr", {}, ["Window", "Attempts", "Succeeded", "Failed", "Deferred", "Success rate"].map(
          (name) => h("th", {scope: "col"}, name)))),
        h("tbody", {}, rows))),
      h("dl", {class: "facts"}, facts([
        ["Last attempt", time(data.lastAttemptAt)],
        ["Last success", time(data.lastSuccessAt)],
        ["Last failure", failure ? [time(failure.at), " ", h("code", {}, failure.eventType), " ",
          failure.status !== null ? `HTTP ${failure.status}` : failure.outcome,
          failure.error ? ` (${failure.error})` : ""] : "none"],
      ])));
  } catch (error) {
    if (!(error instanceof ApiError && error.status === 401)) fill(body, h("p", {}, explain(error)));
  }
}

export function initEndpoints() {
  $("create-form").addEventListener("submit", create);
  $("edit-form").addEventListener("submit", save);
  $("rotate-form").addEventListener("submit", rotate);
  $("test-form").addEventListener("submit", sendTests);
  $("back").addEventListener("click", () => closeEndpoint());
  $("ep-toggle").addEventListener("click", toggle);
  $("ep-delete").addEventListener("click", () => {
    show($("ep-delete-confirm"), true);
    $("ep-delete").setAttribute("aria-expanded", "true");
    $("ep-delete-no").focus();
  });
  $("ep-delete-no").addEventListener("click", () => {
    hideDeleteConfirm();
    $("ep-delete").focus();
  });
  $("ep-delete-yes").addEventListener("click", remove);
  $("health-refresh").addEventListener("click", () => running($("health-refresh"), loadHealth));
}
