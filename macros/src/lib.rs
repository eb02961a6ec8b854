//! The `#[job]` attribute of [Firebrand](https://docs.rs/firebrand): one declaration per job.
//!
//! Use it through `firebrand::job`, which documents it; this crate is an implementation detail
//! of `firebrand` and names its items by absolute path (`::firebrand::...`).

use proc_macro::TokenStream;
use proc_macro2::{Span, TokenStream as TokenStream2};
use quote::{format_ident, quote, quote_spanned};
use syn::parse::{Parse, ParseStream};
use syn::punctuated::Punctuated;
use syn::spanned::Spanned;
use syn::{FnArg, GenericArgument, ItemFn, LitInt, LitStr, PathArguments, ReturnType, Token, Type};

/// Declares a job: see `firebrand::job` for its documentation.
#[proc_macro_attribute]
pub fn job(attr: TokenStream, item: TokenStream) -> TokenStream {
    let options = match syn::parse::<Options>(attr) {
        Ok(options) => options,
        Err(e) => return e.to_compile_error().into(),
    };
    let function = match syn::parse::<ItemFn>(item) {
        Ok(function) => function,
        Err(e) => return e.to_compile_error().into(),
    };
    match expand(options, function) {
        Ok(tokens) => tokens.into(),
        Err(e) => e.to_compile_error().into(),
    }
}

/// The attribute's arguments: `name = "..."`, `timeout = "30s"` (or `"none"`),
/// `queue_timeout = "5s"`, `retries = 3`, `idempotent`, `error = text`, `resource`.
#[derive(Default)]
struct Options {
    name: Option<LitStr>,
    timeout: Option<Deadline>,
    queue_timeout: Option<(u64, Span)>,
    retries: Option<LitInt>,
    idempotent: bool,
    text_errors: bool,
    resource: bool,
}

/// A declared execution deadline.
enum Deadline {
    Millis(u64),
    None,
}

impl Parse for Options {
    fn parse(input: ParseStream<'_>) -> syn::Result<Self> {
        let mut options = Options::default();
        let items = Punctuated::<Setting, Token![,]>::parse_terminated(input)?;
        for setting in items {
            let key = setting.key.to_string();
            let value = setting.value;
            let taken = match key.as_str() {
                "name" => options.name.replace(string(&key, value)?).is_some(),
                "timeout" => {
                    let text = string(&key, value)?;
                    let deadline = if text.value() == "none" {
                        Deadline::None
                    } else {
                        Deadline::Millis(duration_ms(&text)?)
                    };
                    options.timeout.replace(deadline).is_some()
                }
                "queue_timeout" => {
                    let text = string(&key, value)?;
                    let ms = duration_ms(&text)?;
                    options.queue_timeout.replace((ms, text.span())).is_some()
                }
                "retries" => match value {
                    Some(syn::Expr::Lit(syn::ExprLit {
                        lit: syn::Lit::Int(n),
                        ..
                    })) => {
                        n.base10_parse::<u32>()?;
                        options.retries.replace(n).is_some()
                    }
                    _ => {
                        return Err(syn::Error::new(
                            setting.key.span(),
                            "`retries` takes a whole number: `retries = 3`",
                        ))
                    }
                },
                "idempotent" => flag(&setting.key, value, &mut options.idempotent)?,
                "resource" => flag(&setting.key, value, &mut options.resource)?,
                "error" => match value {
                    Some(syn::Expr::Path(p)) if p.path.is_ident("text") => {
                        std::mem::replace(&mut options.text_errors, true)
                    }
                    _ => {
                        return Err(syn::Error::new(
                            setting.key.span(),
                            "`error` takes one value, `text`: `error = text` sends the job's \
                             error to the caller as its Display text",
                        ))
                    }
                },
                _ => {
                    return Err(syn::Error::new(
                        setting.key.span(),
                        format!(
                            "unknown job setting `{key}`; the settings are `name`, `timeout`, \
                             `queue_timeout`, `retries`, `idempotent`, `error = text` and \
                             `resource`"
                        ),
                    ))
                }
            };
            if taken {
                return Err(syn::Error::new(
                    setting.key.span(),
                    format!("`{key}` is given twice"),
                ));
            }
        }
        if options.retries.is_some() && !options.idempotent {
            let span = options
                .retries
                .as_ref()
                .map_or(Span::call_site(), |r| r.span());
            return Err(syn::Error::new(
                span,
                "`retries` needs `idempotent`: a retried call may run the job twice",
            ));
        }
        Ok(options)
    }
}

/// One `key` or `key = value` of the attribute.
struct Setting {
    key: syn::Ident,
    value: Option<syn::Expr>,
}

impl Parse for Setting {
    fn parse(input: ParseStream<'_>) -> syn::Result<Self> {
        let key: syn::Ident = input.parse()?;
        let value = if input.peek(Token![=]) {
            input.parse::<Token![=]>()?;
            Some(input.parse()?)
        } else {
            None
        };
        Ok(Setting { key, value })
    }
}

fn string(key: &str, value: Option<syn::Expr>) -> syn::Result<LitStr> {
    match value {
        Some(syn::Expr::Lit(syn::ExprLit {
            lit: syn::Lit::Str(s),
            ..
        })) => Ok(s),
        other => Err(syn::Error::new(
            other.map_or(Span::call_site(), |v| v.span()),
            format!("`{key}` takes a string: `{key} = \"...\"`"),
        )),
    }
}

fn flag(key: &syn::Ident, value: Option<syn::Expr>, set: &mut bool) -> syn::Result<bool> {
    if value.is_some() {
        return Err(syn::Error::new(
            key.span(),
            format!("`{key}` takes no value: write `{key}` alone"),
        ));
    }
    Ok(std::mem::replace(set, true))
}

/// `"500ms"`, `"30s"`, `"5m"`, `"2h"` in milliseconds.
fn duration_ms(text: &LitStr) -> syn::Result<u64> {
    let value = text.value();
    let bad = || {
        syn::Error::new(
            text.span(),
            format!(
                "`{value}` is not a duration: write a whole number and a unit, as \"500ms\", \
                 \"30s\", \"5m\" or \"2h\" (or \"none\" for no execution deadline)"
            ),
        )
    };
    let split = value.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (number, unit) = value.split_at(split);
    let number: u64 = number.parse().map_err(|_| bad())?;
    let scale = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => return Err(bad()),
    };
    let ms = number.checked_mul(scale).ok_or_else(bad)?;
    if ms == 0 {
        return Err(syn::Error::new(
            text.span(),
            "a zero duration would fail every call; write \"none\" for no execution deadline",
        ));
    }
    Ok(ms)
}

/// What the function's return type says of the job's result and error.
struct Output {
    /// The result type `R`.
    result: Type,
    /// The error type, if the function returns a `Result` that names one.
    error: Option<Type>,
    /// Whether the function returns a `Result` at all.
    fallible: bool,
}

fn output(ret: &ReturnType) -> Output {
    let ty = match ret {
        ReturnType::Default => {
            return Output {
                result: syn::parse_quote!(()),
                error: None,
                fallible: false,
            }
        }
        ReturnType::Type(_, ty) => &**ty,
    };
    if let Type::Path(path) = ty {
        if let Some(last) = path.path.segments.last() {
            if last.ident == "Result" {
                if let PathArguments::AngleBracketed(args) = &last.arguments {
                    let types: Vec<&Type> = args
                        .args
                        .iter()
                        .filter_map(|a| match a {
                            GenericArgument::Type(t) => Some(t),
                            _ => None,
                        })
                        .collect();
                    match types.as_slice() {
                        [result, error] => {
                            return Output {
                                result: (*result).clone(),
                                error: Some((*error).clone()),
                                fallible: true,
                            }
                        }
                        // `anyhow::Result<T>`, `io::Result<T>`: an alias whose error is not
                        // named here, so it crosses as text.
                        [result] => {
                            return Output {
                                result: (*result).clone(),
                                error: None,
                                fallible: true,
                            }
                        }
                        _ => {}
                    }
                }
            }
        }
    }
    Output {
        result: ty.clone(),
        error: None,
        fallible: false,
    }
}

fn expand(options: Options, function: ItemFn) -> syn::Result<TokenStream2> {
    let sig = &function.sig;
    if !sig.generics.params.is_empty() || sig.generics.where_clause.is_some() {
        return Err(syn::Error::new(
            sig.generics.span(),
            "a job cannot be generic: its argument and result types are part of its name on \
             the wire; declare one job per type",
        ));
    }
    if let Some(variadic) = &sig.variadic {
        return Err(syn::Error::new(variadic.span(), "a job cannot be variadic"));
    }
    let is_async = sig.asyncness.is_some();
    let fn_name = &sig.ident;
    let wire_name = options
        .name
        .clone()
        .unwrap_or_else(|| LitStr::new(&fn_name.to_string(), fn_name.span()));
    if wire_name.value().is_empty() {
        return Err(syn::Error::new(
            wire_name.span(),
            "a job name cannot be empty",
        ));
    }

    // Parameters: an optional `&T` resource first, then the job's arguments.
    let mut params = Vec::new();
    for input in &sig.inputs {
        match input {
            FnArg::Receiver(r) => {
                return Err(syn::Error::new(
                    r.span(),
                    "a job is a free function; it cannot take `self`",
                ))
            }
            FnArg::Typed(p) => params.push((*p.ty).clone()),
        }
    }
    let resource_type = match params.first() {
        Some(Type::Reference(r)) => {
            if r.mutability.is_some() {
                return Err(syn::Error::new(
                    r.span(),
                    "a job's resource is shared by the calls on its runner: take it as `&T`, \
                     not `&mut T` (use a lock inside `T` to change it)",
                ));
            }
            Some((*r.elem).clone())
        }
        _ => None,
    };
    let args: Vec<Type> = params
        .iter()
        .skip(usize::from(resource_type.is_some()))
        .cloned()
        .collect();
    if let Some(t) = args.iter().find(|t| matches!(t, Type::Reference(_))) {
        return Err(syn::Error::new(
            t.span(),
            "a job's arguments cross the wire, so they are owned values: only the first \
             parameter may be a reference, to the resource the job runs with",
        ));
    }
    let arg_names: Vec<_> = (0..args.len()).map(|i| format_ident!("__arg{i}")).collect();
    let (args_type, args_pattern) = match args.len() {
        1 => {
            let (t, n) = (&args[0], &arg_names[0]);
            (quote!(#t), quote!(#n))
        }
        _ => (quote!((#(#args,)*)), quote!((#(#arg_names,)*))),
    };

    let out = output(&sig.output);
    let result = &out.result;
    let error_type = match (&out.error, options.text_errors) {
        (Some(e), false) => quote!(#e),
        _ => quote!(::firebrand::RemoteError),
    };
    if options.resource && resource_type.is_some() {
        return Err(syn::Error::new(
            sig.inputs.span(),
            "a resource job makes a resource; it cannot run with one",
        ));
    }
    if !is_async && (options.resource || resource_type.is_some()) {
        return Err(syn::Error::new(
            sig.fn_token.span(),
            "resource jobs, and jobs that use a resource, are `async fn`s",
        ));
    }

    let body_name = format_ident!("__firebrand_job_{}", fn_name);
    let mut body = function.clone();
    body.sig.ident = body_name.clone();
    body.vis = syn::Visibility::Inherited;
    body.attrs.retain(|a| !a.path().is_ident("doc"));
    let docs: Vec<_> = function
        .attrs
        .iter()
        .filter(|a| a.path().is_ident("doc"))
        .collect();
    let vis = &function.vis;

    // The body's output, as the `Result` the registry takes.
    let call_body = |call: TokenStream2| {
        if out.fallible {
            call
        } else {
            quote!(::core::result::Result::Ok::<_, ::firebrand::RemoteError>(#call))
        }
    };

    let mut settings = TokenStream2::new();
    if let Some(deadline) = &options.timeout {
        settings.extend(match deadline {
            Deadline::Millis(ms) => {
                quote!(.timeout(::core::time::Duration::from_millis(#ms)))
            }
            Deadline::None => quote!(.no_timeout()),
        });
    }
    if let Some((ms, _)) = options.queue_timeout {
        settings.extend(quote!(.queue_timeout(::core::time::Duration::from_millis(#ms))));
    }
    if options.idempotent {
        settings.extend(quote!(.idempotent()));
    }
    if let Some(n) = &options.retries {
        settings.extend(quote!(.retries(#n)));
    }

    let (handle_type, register) = if options.resource {
        if options.timeout.is_some() || options.queue_timeout.is_some() || options.idempotent {
            return Err(syn::Error::new(
                fn_name.span(),
                "a resource job takes `name` and `error = text` only; set a deadline on \
                 `pool.resource(..)`",
            ));
        }
        let made = call_body(quote!(#body_name(#(#arg_names),*).await));
        (
            quote!(::firebrand::ResourceJob<#args_type, #result>),
            quote! {
                registry.register_resource(&#fn_name, |#args_pattern: #args_type| async move {
                    #made
                })
            },
        )
    } else if let Some(resource) = &resource_type {
        let made = call_body(quote!(#body_name(&*__resource, #(#arg_names),*).await));
        (
            quote!(::firebrand::UsingJob<#resource, #args_type, #result, #error_type>),
            quote! {
                registry.register_using(
                    &#fn_name,
                    |__resource: ::std::sync::Arc<#resource>, #args_pattern: #args_type| {
                        async move { #made }
                    },
                )
            },
        )
    } else if is_async {
        let made = call_body(quote!(#body_name(#(#arg_names),*).await));
        (
            quote!(::firebrand::Job<#args_type, #result, #error_type>),
            quote! {
                registry.register(&#fn_name, |#args_pattern: #args_type| async move { #made })
            },
        )
    } else {
        let made = call_body(quote!(#body_name(#(#arg_names),*)));
        (
            quote!(::firebrand::Job<#args_type, #result, #error_type>),
            quote! {
                registry.register_blocking(&#fn_name, |#args_pattern: #args_type| #made)
            },
        )
    };
    let constructor = if options.resource {
        quote!(::firebrand::ResourceJob::new(#wire_name))
    } else if resource_type.is_some() {
        quote!(::firebrand::UsingJob::new(#wire_name))
    } else {
        quote!(::firebrand::Job::new(#wire_name))
    };
    // The error type is checked where it is named, so the message points at it.
    let error_check = match (&out.error, options.text_errors) {
        (Some(e), false) => quote_spanned! {e.span()=>
            const _: fn() = || {
                fn job_error_type<E: ::firebrand::JobError>() {}
                job_error_type::<#e>();
            };
        },
        _ => TokenStream2::new(),
    };
    let register_fn = format_ident!("__firebrand_register_{}", fn_name);

    Ok(quote! {
        #(#docs)*
        #[allow(non_upper_case_globals)]
        #vis const #fn_name: #handle_type = #constructor #settings;

        #[allow(non_snake_case)]
        const _: () = {
            #error_check

            #[allow(clippy::needless_lifetimes)]
            #body

            fn #register_fn(
                registry: &mut ::firebrand::Registry,
            ) -> ::core::result::Result<(), ::firebrand::RegistryError> {
                #register.map(|_| ())
            }

            ::firebrand::__private::inventory::submit! {
                ::firebrand::__private::CollectedJob {
                    name: #wire_name,
                    function: ::core::concat!(::core::module_path!(), "::", ::core::stringify!(#fn_name)),
                    register: #register_fn,
                }
            }
        };
    })
}
