// What every part of the page shares: the session's state, the announcements (a live
// region read out by screen readers), problems, the fields an answer named, busy buttons.

import {ApiError, explain} from "./api.js";
import {$, fill, h} from "./dom.js";

export const state = {
  /** The bot this page is for (from the token). */
  bot: null,
  /** The bot's endpoints by id, secrets masked. */
  endpoints: new Map(),
  /** The id of the endpoint open in the detail view, or null. */
  current: null,
};

export const MASKED = "whsec_********";

/** An endpoint answer with its secret masked: a secret is shown once, never kept. */
export function masked(endpoint) {
  return {...endpoint, secret: MASKED};
}

/** Say ``text`` in the status line (and to screen readers); clears any problem. */
export function announce(text) {
  clearProblem();
  $("status").textContent = text;
}

/** Show a problem: an ApiError (explained), or a sentence. Moves no focus: the region
 * is an alert, read out at once. */
export function problem(what) {
  const box = $("problem");
  const text = what instanceof Error ? explain(what) : String(what);
  const lines = [h("p", {}, text)];
  if (what instanceof ApiError) {
    for (const item of what.fields) {
      if (item.detail !== what.message) lines.push(h("p", {}, item.field ? `${item.field}: ` : "", item.detail));
    }
  }
  $("status").textContent = "";
  fill(box, ...lines);
  box.hidden = false;
}

export function clearProblem() {
  const box = $("problem");
  box.replaceChildren();
  box.hidden = true;
}

// The API's name of an input, and the suffix of its field's id in the page's forms.
const FIELD_IDS = {
  url: "url", description: "description", events: "events", secret: "secret", rateLimit: "rate",
  maxInFlight: "inflight", since: "since", eventId: "event", rate: "rate",
};

export function clearFieldErrors(form) {
  for (const field of form.querySelectorAll("[aria-invalid]")) field.removeAttribute("aria-invalid");
  for (const message of form.querySelectorAll(".field-error")) {
    message.textContent = "";
    message.hidden = true;
  }
}

/** Mark the fields of ``form`` (ids ``prefix-…``) that ``error`` names, each with its
 * message, and focus the first; the rest goes to the problem line. */
export function showError(form, prefix, error) {
  clearFieldErrors(form);
  const marked = [];
  const rest = [];
  if (error instanceof ApiError && error.status === 422) {
    for (const item of error.fields) {
      const name = String(item.field || "").replace(/[[.].*$/, "");
      const suffix = FIELD_IDS[name];
      const message = suffix && document.getElementById(`${prefix}-${suffix}-error`);
      if (message) {
        message.textContent = item.detail;
        message.hidden = false;
        const input = document.getElementById(`${prefix}-${suffix}`)
          || form.querySelector(`input[id^="${prefix}-${suffix}-"]`);
        if (input) {
          input.setAttribute("aria-invalid", "true");
          marked.push(input);
        }
      } else {
        rest.push(item);
      }
    }
  }
  if (marked.length) {
    problem(`Check the ${marked.length === 1 ? "field" : "fields"} marked below: ${error.message}`);
    marked[0].focus();
  } else {
    problem(error);
  }
}

/** Run ``work`` with ``button`` disabled and marked busy; errors go to ``onError``
 * (default: the problem line). */
export async function running(button, work, onError = problem) {
  button.disabled = true;
  button.setAttribute("aria-busy", "true");
  try {
    return await work();
  } catch (error) {
    if (!(error instanceof ApiError && error.status === 401)) onError(error);
    return undefined;
  } finally {
    button.disabled = false;
    button.removeAttribute("aria-busy");
  }
}

/** A one-time secret: its heading, some lines, the value in a read-only field with a
 * Copy button, and a button to hide it. */
export function secretOnce(container, heading, lines, secret) {
  const id = `secret-${crypto.randomUUID()}`;
  const input = h("input", {id, type: "text", readonly: true, class: "secret-value", spellcheck: "false",
    autocomplete: "off"});
  input.value = secret;
  const said = h("p", {class: "hint", "aria-live": "polite"});
  const copy = h("button", {type: "button", class: "copy"}, "Copy secret");
  copy.addEventListener("click", async () => {
    try {
      await navigator.clipboard.writeText(secret);
      said.textContent = "Copied to the clipboard.";
    } catch {
      input.focus();
      input.select();
      said.textContent = "Selected: press Ctrl+C (⌘C on a Mac) to copy it.";
    }
  });
  const hide = h("button", {type: "button", class: "secondary"}, "I have saved it: hide it");
  hide.addEventListener("click", () => {
    container.replaceChildren();
    announce("The secret is hidden: it cannot be shown again (rotate it for a new one).");
  });
  fill(container, h("div", {class: "secret-once", role: "group", "aria-labelledby": `${id}-h`},
    h("h4", {id: `${id}-h`}, heading),
    lines,
    h("label", {for: id}, "Signing secret, shown this once: copy it now"),
    h("div", {class: "line"}, input, copy),
    said,
    hide));
  copy.focus();
}
