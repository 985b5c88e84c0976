// /docs: Swagger UI over /openapi.json; the console's API key (this tab's session storage) is
// sent as a Bearer header on every call Swagger UI makes, the spec fetch included.
"use strict";
(function () {
  const KEY = "omnirt.apiKey";
  const form = document.getElementById("docs-key");
  const input = document.getElementById("docs-key-input");
  input.value = sessionStorage.getItem(KEY) || "";
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    if (input.value.trim()) sessionStorage.setItem(KEY, input.value.trim());
    else sessionStorage.removeItem(KEY);
    location.reload();
  });
  window.ui = SwaggerUIBundle({
    url: "/openapi.json",
    dom_id: "#swagger-ui",
    deepLinking: true,
    tryItOutEnabled: true,
    requestInterceptor: (req) => {
      const key = sessionStorage.getItem(KEY);
      if (key && !req.headers.Authorization) req.headers.Authorization = "Bearer " + key;
      return req;
    },
  });
})();
