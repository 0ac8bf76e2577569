// Building the page's DOM. Every node is made with createElement, every text is a text
// node: nothing the API returns (URLs, descriptions, response snippets, payloads are
// whoever wrote them) is ever parsed as HTML. Attributes are set with setAttribute, and
// none of them is a URL or an event handler taken from data.
//
// Long text is hostile too, to the layout: Chromium lays out one unbroken run of tens of
// thousands of characters in seconds to minutes (measured: 60,000 characters that
// alternate Latin and Arabic letters, 41 s; a 60 KB description froze the page). So a
// run without spaces gets a <wbr> every RUN characters (a line may break there; copying
// the text gives it back unchanged), and no text shows more than SHOWN characters.

const EVENT = /^on[a-z]+$/;
const RUN = 64;
const LONG_RUN = new RegExp(`\\S{${RUN + 1},}`, "g");
/** The most characters of one text the page lays out. */
export const SHOWN = 4000;

/** ``value`` as text nodes, with a <wbr> every RUN characters of a long run, at most
 * SHOWN characters of it, and a note of how many more there are. */
export function text(value) {
  const whole = String(value);
  const fragment = document.createDocumentFragment();
  const shown = whole.length > SHOWN ? whole.slice(0, SHOWN) : whole;
  let last = 0;
  for (const match of shown.matchAll(LONG_RUN)) {
    fragment.append(shown.slice(last, match.index));
    const run = match[0];
    for (let start = 0; start < run.length;) {
      let end = Math.min(start + RUN, run.length);
      const code = run.charCodeAt(end - 1);
      if (end < run.length && code >= 0xd800 && code <= 0xdbff) end -= 1;  // not inside a surrogate pair
      fragment.append(run.slice(start, end));
      if (end < run.length) fragment.append(document.createElement("wbr"));
      start = end;
    }
    last = match.index + run.length;
  }
  fragment.append(shown.slice(last));
  if (shown.length < whole.length) {
    fragment.append(h("span", {class: "cut"}, ` [… ${(whole.length - shown.length).toLocaleString("en")} more `
      + "characters, not shown]"));
  }
  return fragment;
}

/** An element: h("p", {class: "hint"}, "text", child, …). Children that are null,
 * undefined or false are left out; strings become text nodes. */
export function h(tag, attributes = {}, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value === null || value === undefined || value === false) continue;
    if (EVENT.test(name)) {
      if (typeof value !== "function") throw new TypeError(`${name} must be a function`);
      element.addEventListener(name.slice(2), value);
    } else if (name === "class") {
      element.className = value;
    } else if (name === "dataset") {
      Object.assign(element.dataset, value);
    } else {
      element.setAttribute(name, value === true ? "" : String(value));
    }
  }
  append(element, children);
  return element;
}

function append(element, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    element.append(child instanceof Node ? child : text(child));
  }
}

/** Replace what ``element`` holds with ``children``. */
export function fill(element, ...children) {
  element.replaceChildren();
  append(element, children);
  return element;
}

export function $(id) {
  const found = document.getElementById(id);
  if (found === null) throw new Error(`no element #${id}`);
  return found;
}

export function show(element, visible = true) {
  element.hidden = !visible;
}

const pad = (n, width = 2) => String(n).padStart(width, "0");

/** A time from the API (ISO 8601, UTC) as the reader's local time, in a <time>. */
export function time(iso) {
  if (!iso) return h("span", {class: "hint"}, "never");
  const when = new Date(iso);
  if (Number.isNaN(when.getTime())) return h("span", {}, String(iso));
  const text = `${when.getFullYear()}-${pad(when.getMonth() + 1)}-${pad(when.getDate())} `
    + `${pad(when.getHours())}:${pad(when.getMinutes())}:${pad(when.getSeconds())}`;
  return h("time", {datetime: iso, title: iso}, text);
}

export function ms(value) {
  if (value === null || value === undefined) return "";
  return value < 10 ? `${value.toFixed(1)} ms` : `${Math.round(value)} ms`;
}

export function percent(rate) {
  return rate === null || rate === undefined ? "–" : `${(rate * 100).toFixed(rate === 1 ? 0 : 1)} %`;
}

/** A long text: the first ``limit`` characters, the rest (up to SHOWN) behind a toggle. */
export function longText(value, limit = 280) {
  const whole = String(value);
  if (whole.length <= limit) return h("span", {class: "text"}, whole);
  const label = `Show all (${whole.length.toLocaleString("en")} characters)`;
  const rest = h("div", {class: "text", hidden: true});
  const start = h("span", {}, whole.slice(0, limit) + "…");
  const toggle = h("button", {type: "button", class: "link", "aria-expanded": "false"}, label);
  toggle.addEventListener("click", () => {
    const open = toggle.getAttribute("aria-expanded") !== "true";
    if (open && !rest.firstChild) rest.append(text(whole));  // laid out only when asked for
    toggle.setAttribute("aria-expanded", String(open));
    toggle.textContent = open ? "Show less" : label;
    rest.hidden = !open;
    start.hidden = open;
  });
  return h("div", {}, start, rest, toggle);
}

/** The values of the checked boxes named ``name`` in ``form``. */
export function checked(form, name) {
  return [...form.querySelectorAll(`input[type=checkbox][name="${name}"]`)].filter((b) => b.checked)
    .map((b) => b.value);
}

export function setChecked(form, name, values) {
  const wanted = new Set(values);
  for (const box of form.querySelectorAll(`input[type=checkbox][name="${name}"]`)) box.checked = wanted.has(box.value);
}

/** A <dl> of [term, description] pairs (descriptions may be nodes). */
export function facts(pairs) {
  return pairs.filter(([, d]) => d !== null && d !== undefined)
    .flatMap(([term, description]) => [h("dt", {}, term), h("dd", {}, description)]);
}

/** A table cell with the column's name for the stacked layout of narrow screens. */
export function cell(label, ...children) {
  return h("td", {"data-label": label}, ...children);
}

/** A "Detail" button for a row of a table with ``columns`` columns: it shows (or hides)
 * a row under it, across the whole table, filled by ``build(cell)`` the first time. */
export function detailButton(columns, build) {
  const button = h("button", {type: "button", class: "link", "aria-expanded": "false"}, "Detail");
  let row = null;
  button.addEventListener("click", () => {
    const open = button.getAttribute("aria-expanded") !== "true";
    button.setAttribute("aria-expanded", String(open));
    if (open && row === null) {
      const id = `detail-${crypto.randomUUID()}`;
      const holder = h("td", {colspan: String(columns), class: "detail", id});
      row = h("tr", {class: "detail-row"}, holder);
      button.setAttribute("aria-controls", id);
      button.closest("tr").after(row);
      build(holder);
    }
    if (row !== null) row.hidden = !open;
  });
  return button;
}

/** A table shown a page at a time, newest first, with a "more" button for older rows
 * and a summary counting what is shown: ``<table id=NAME-table>``, ``NAME-more``,
 * ``NAME-summary``; ``row(item)`` makes each row, ``noun`` counts them ("attempt"). */
export function pages(name, noun, row) {
  const table = $(`${name}-table`);
  const more = $(`${name}-more`);
  const summary = $(`${name}-summary`);
  const body = table.querySelector("tbody");
  let cursor = null;
  let shown = 0;
  return {
    /** The cursor to ask with: the next page's for ``older``, else none (the first page). */
    cursor: (older) => (older ? cursor : null),
    /** Show a page the API answered (``{data, nextCursor}``): after the rows shown for
     * ``older``, else instead of them; ``note`` ends the summary. */
    show(page, older, note = null) {
      if (!older) {
        body.replaceChildren();
        shown = 0;
      }
      body.append(...page.data.map(row));
      shown += page.data.length;
      cursor = page.nextCursor;
      show(table, shown > 0);
      show(more, Boolean(cursor));
      fill(summary, shown === 0 ? `No ${noun} matches.` : `${shown} ${noun}${shown === 1 ? "" : "s"}`
        + (cursor ? " so far; older ones below." : "."), note);
    },
    reset() {
      cursor = null;
      shown = 0;
      body.replaceChildren();
      show(table, false);
      show(more, false);
      summary.textContent = "";
    },
  };
}
