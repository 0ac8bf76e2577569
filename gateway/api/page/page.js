// The Settings > Webhooks page: who it is for (the bot of its token), signing in and out,
// and the parts of the page (endpoints.js, history.js, deadletters.js).

import {claims, forget, remember, takeFragment, token, whenSignedOut} from "./api.js";
import {$, fill, show, time} from "./dom.js";
import {initDeadLetters, loadDeadLetters, resetDeadLetters} from "./deadletters.js";
import {closeEndpoint, initEndpoints, loadEndpoints, openEndpoint} from "./endpoints.js";
import {initHistory} from "./history.js";
import {announce, clearProblem, problem, state} from "./ui.js";

const FROM_SETTINGS = "Open this page from your platform's Settings › Webhooks: it signs you in for your bot.";
let expiry = null;

function signIn(why) {
  clearTimeout(expiry);
  state.bot = null;
  state.endpoints = new Map();
  state.current = null;
  show($("app"), false);
  show($("session"), false);
  show($("nav"), false);
  show($("signin"), true);
  $("signin-why").textContent = why;
  document.body.dataset.state = "signed-out";
  $("signin-token").focus();
}

async function start(deepLink) {
  const current = token();
  if (!current) {
    signIn(`This page needs your bot's token. ${FROM_SETTINGS}`);
    return;
  }
  const found = claims(current);
  if (found === null) {
    forget();
    signIn("That is not a token minted for one bot (such a token begins with gwb1.). " + FROM_SETTINGS);
    return;
  }
  if (found.expiresAt <= new Date()) {
    forget();
    signIn(`Your session has ended. ${FROM_SETTINGS}`);
    return;
  }
  state.bot = found.bot;
  $("bot-id").textContent = found.bot;
  fill($("expires"), "· session until ", time(found.expiresAt.toISOString()));
  clearTimeout(expiry);
  expiry = setTimeout(() => {
    forget();
    signIn(`Your session has ended. ${FROM_SETTINGS}`);
  }, Math.min(found.expiresAt - new Date(), 2 ** 31 - 1));
  show($("signin"), false);
  show($("app"), true);
  show($("session"), true);
  show($("nav"), true);
  closeEndpoint({focus: false});
  resetDeadLetters();
  document.body.dataset.state = "loading";
  try {
    await loadEndpoints();
    await loadDeadLetters();
    if (deepLink.endpoint) await openEndpoint(deepLink.endpoint);
  } catch (error) {
    if (!token()) return;  // signed out on the way (401)
    problem(error);
  }
  if (token()) document.body.dataset.state = "ready";
}

function init() {
  const deepLink = takeFragment();
  whenSignedOut(() => {
    forget();
    signIn(`Your session has ended (its token expired or is no longer valid). ${FROM_SETTINGS}`);
  });
  $("signin-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const field = $("signin-token");
    const value = field.value.trim();
    field.value = "";
    if (!value) return;
    remember(value);
    clearProblem();
    start({endpoint: null});
  });
  $("sign-out").addEventListener("click", () => {
    forget();
    signIn("Signed out. " + FROM_SETTINGS);
    announce("Signed out: the token is gone from this tab.");
  });
  // The platform may open the page again in the same tab with a fresh token (or a link
  // to one endpoint): a change of the fragment alone does not load the page again.
  window.addEventListener("hashchange", () => {
    const link = takeFragment();
    if (link.token) {
      clearProblem();
      start(link);
    } else if (link.endpoint && state.bot) {
      openEndpoint(link.endpoint);
    }
  });
  // "Endpoints" in the navigation leads back to the list from an endpoint's view.
  document.querySelector('#nav a[href="#endpoints-h"]').addEventListener("click", () => closeEndpoint({focus: false}));
  initEndpoints();
  initHistory();
  initDeadLetters();
  start(deepLink);
}

init();
