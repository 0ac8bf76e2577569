// The bot's dead letters: newest first with filters, each one's record and attempt log,
// and replay: a dry run first (what would be replayed, what is skipped and why), then
// the replay itself as a job whose progress is shown until it ends.

import {ApiError, call, newKey} from "./api.js";
import {$, cell, detailButton, facts, fill, h, ms, pages, time} from "./dom.js";
import {announce, clearFieldErrors, running, showError, state} from "./ui.js";

const letters = pages("dlq", "dead letter", row);  // the table of dead letters, page by page
let preview = null;  // {body: the replay's request, as previewed}
let generation = 0;  // a reset (sign-out, another token) stops the polling of a running replay

const REASONS = {
  retries_exhausted: "retries exhausted", endpoint_disabled: "endpoint disabled",
  endpoint_removed: "endpoint removed", blocked_destination: "address refused", gone: "gone (410)",
};

function filters() {
  const form = $("dlq-form");
  return {
    endpointId: form.elements.endpointId.value, reason: form.elements.reason.value,
    eventType: form.elements.eventType.value, since: form.elements.since.value.trim(),
  };
}

function endpointLabel(id) {
  const endpoint = id ? state.endpoints.get(id) : null;
  return endpoint ? endpoint.url : id ?? "–";
}

/** The endpoint filter's choices: every endpoint of the bot, by URL. */
export function refreshEndpointChoices() {
  const select = $("dlq-endpoint");
  const chosen = select.value;
  fill(select, h("option", {value: ""}, "every endpoint"), [...state.endpoints.values()].map(
    (endpoint) => h("option", {value: endpoint.id}, endpoint.url.length > 90 ? `${endpoint.url.slice(0, 90)}…`
      : endpoint.url)));
  select.value = state.endpoints.has(chosen) ? chosen : "";
}

export function resetDeadLetters() {
  generation += 1;
  preview = null;
  $("dlq-form").reset();
  $("replay-form").reset();
  letters.reset();
  $("replay-result").replaceChildren();
}

async function showRecord(holder, id) {
  fill(holder, "Loading…");
  try {
    const {data} = await call("GET", `/v1/dead-letters/${encodeURIComponent(id)}`);
    fill(holder, data.map((record) => h("div", {class: "record"},
      h("dl", {class: "facts"}, facts([
        ["Why", record.detail || REASONS[record.reason] || record.reason],
        ["Event id", record.eventId ? h("code", {}, record.eventId) : null],
        ["Dead letter", h("code", {}, record.id)],
        ["Occurred", record.occurredAt ? time(record.occurredAt) : null],
        ["Error", record.error],
      ])),
      record.attemptLog && record.attemptLog.length ? h("div", {class: "table-wrap"}, h("table", {class: "rows"},
        h("caption", {}, "Its attempts"),
        h("thead", {}, h("tr", {}, ["When", "Tier", "Status", "Took", "Error", "Answer"].map(
          (name) => h("th", {scope: "col"}, name)))),
        h("tbody", {}, record.attemptLog.map((attempt) => h("tr", {},
          cell("When", time(attempt.at)), cell("Tier", attempt.tier),
          cell("Status", attempt.status === null ? "no answer" : String(attempt.status)),
          cell("Took", ms(attempt.durationMs)), cell("Error", attempt.error ?? ""),
          cell("Answer", attempt.response ? h("pre", {class: "snippet"}, attempt.response) : "")))))) : null,
      record.payload ? [h("p", {}, "The event:"), h("pre", {class: "json"}, record.payload)] : null)));
  } catch (error) {
    if (!(error instanceof ApiError && error.status === 401)) fill(holder, h("p", {}, error.message));
  }
}

function row(letter) {
  return h("tr", {dataset: {deadLetter: letter.id}},
    cell("Dead since", time(letter.deadAt)),
    cell("Event", h("code", {}, letter.eventType ?? "?")),
    cell("Endpoint", endpointLabel(letter.endpointId)),
    cell("Reason", REASONS[letter.reason] ?? letter.reason,
      letter.lastStatus !== null ? ` (last: HTTP ${letter.lastStatus})` : "",
      letter.replayOf ? " · a replay" : ""),
    cell("Attempts", String(letter.attempts)),
    cell("Detail", detailButton(6, (holder) => showRecord(holder, letter.id))));
}

export async function loadDeadLetters(more = false) {
  const {data} = await call("GET", "/v1/dead-letters", {query: {...filters(), limit: 50, cursor: letters.cursor(more)}});
  letters.show(data, more);
  clearFieldErrors($("dlq-form"));
}

// --- replay -------------------------------------------------------------------------------

function replayBody() {
  const chosen = Object.fromEntries(Object.entries(filters()).filter(([, value]) => value));
  const form = $("replay-form");
  const body = {...chosen, again: form.elements.again.checked};
  if (Object.keys(chosen).length === 0) body.all = true;
  if (form.elements.rate.value.trim()) body.rate = `${Number(form.elements.rate.value)}/s`;
  return body;
}

function plan(job) {
  const lines = [h("p", {id: "replay-plan"}, `${job.planned} dead letter${job.planned === 1 ? "" : "s"} would be `
    + "replayed, each to the endpoint it failed for.",
    job.skippedAlreadyReplayed ? ` ${job.skippedAlreadyReplayed} replayed before ${job.skippedAlreadyReplayed === 1
      ? "is" : "are"} skipped (check "Include dead letters replayed before" to send them again).` : "",
    job.refusedCount ? ` ${job.refusedCount} cannot be replayed:` : "")];
  if (job.refused.length) {
    lines.push(h("ul", {}, job.refused.map((refusal) => h("li", {}, h("code", {}, refusal.id), " ",
      refusal.message))));
  }
  if (job.items.length) {
    lines.push(h("details", {}, h("summary", {}, "What would be replayed"), h("ul", {}, job.items.slice(0, 200).map(
      (item) => h("li", {}, h("code", {}, item.eventType), " ", h("code", {}, item.eventId), " → ",
        endpointLabel(item.endpointId))))));
  }
  return lines;
}

async function previewReplay(event) {
  event.preventDefault();
  const form = event.currentTarget;
  const body = replayBody();
  const result = $("replay-result");
  await running(form.querySelector("button[type=submit]"), async () => {
    const {data} = await call("POST", "/v1/dead-letters/replay", {body: {...body, dryRun: true}});
    preview = {body, key: newKey()};
    const go = data.planned > 0 ? h("button", {type: "button", id: "replay-go", class: "danger"},
      `Replay ${data.planned} dead letter${data.planned === 1 ? "" : "s"}`) : null;
    if (go) go.addEventListener("click", () => replay(go));
    fill(result, h("h4", {}, "Preview (nothing sent yet)"), plan(data), go);
    announce(`Preview: ${data.planned} dead letter${data.planned === 1 ? "" : "s"} would be replayed.`);
  }, (error) => showError(form, "replay", error));
}

function progressOf(job) {
  const progress = job.progress ?? {total: job.planned, sent: 0, acknowledged: 0, failed: 0, rate: 0};
  return [
    h("progress", {id: "replay-progress", max: String(Math.max(progress.total, 1)), value: String(progress.acknowledged),
      "aria-label": "Replay progress"}),
    h("p", {}, `Sent ${progress.sent} of ${progress.total}, acknowledged by the broker ${progress.acknowledged}, `
      + `failed ${progress.failed}` + (progress.rate ? ` (${progress.rate.toFixed(1)}/s).` : ".")),
  ];
}

function outcome(job) {
  const result = job.result;
  if (job.state === "succeeded" && result) {
    return h("p", {class: "verdict-ok", id: "replay-done"}, `Replayed ${result.replayed} dead letter`
      + `${result.replayed === 1 ? "" : "s"} in ${result.seconds.toFixed(1)} s: each goes to its endpoint again now, `
      + "through the retry tiers. Their attempts appear in the endpoint's delivery history.");
  }
  return h("p", {class: "verdict-bad", id: "replay-done"}, "The replay failed",
    job.error ? `: ${job.error}` : "", result ? ` (${result.replayed} replayed, ${result.failed} failed; first `
      + `failure: ${result.firstFailure ?? "–"})` : "", ". Preview again to see what is left.");
}

async function replay(button) {
  if (preview === null) return;
  const chosen = preview;
  const result = $("replay-result");
  await running(button, async () => {
    const {data} = await call("POST", "/v1/dead-letters/replay", {body: chosen.body, idempotencyKey: chosen.key});
    preview = null;
    const status = h("div", {id: "replay-status"}, progressOf(data));
    fill(result, h("h4", {}, "Replay ", h("code", {}, data.id)), status);
    announce(`Replay started: ${data.planned} dead letters.`);
    await watch(data.id, status);
  });
}

/** Poll the job until it ends, showing its progress; stops when the page is reset. */
async function watch(id, status) {
  const mine = generation;
  for (;;) {
    const {data} = await call("GET", `/v1/replays/${encodeURIComponent(id)}`);
    if (mine !== generation) return;
    fill(status, progressOf(data));
    if (data.state !== "running") {
      status.append(outcome(data));
      announce(data.state === "succeeded" ? `Replay finished: ${data.result.replayed} replayed.`
        : "The replay failed: see below.");
      return;
    }
    await new Promise((resolve) => setTimeout(resolve, 400));
  }
}

export function initDeadLetters() {
  $("dlq-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const form = event.currentTarget;
    await running(form.querySelector("button[type=submit]"), () => loadDeadLetters(false),
      (error) => showError(form, "dlq", error));
  });
  $("dlq-more").addEventListener("click", () => running($("dlq-more"), () => loadDeadLetters(true)));
  $("replay-form").addEventListener("submit", previewReplay);
  // A preview holds for the selection it was made for: a changed filter needs a new one.
  for (const form of [$("dlq-form"), $("replay-form")]) {
    for (const kind of ["change", "input"]) {
      form.addEventListener(kind, () => {
        if (preview !== null) {
          preview = null;
          $("replay-result").replaceChildren();
        }
      });
    }
  }
}
